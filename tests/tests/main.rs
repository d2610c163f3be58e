//! The workspace's one integration-test binary: cross-crate and black-box
//! tests, one module per concern.

mod abi;
mod faults;
mod green;
mod zoo;
mod zoo_load;

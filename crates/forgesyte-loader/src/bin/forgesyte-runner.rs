//! `forgesyte-runner`: hosts one plugin in its own process for the ForgeSyte
//! loader (process isolation). Started by the host, never by people; see
//! `forgesyte_loader::process`.

fn main() -> std::process::ExitCode {
    forgesyte_loader::process::runner_main(std::env::args_os().skip(1))
}

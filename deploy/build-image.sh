#!/usr/bin/env bash
# Builds the forgesyte image from the repository's Dockerfile with podman
# or docker, whichever is installed and working (podman first).
#   deploy/build-image.sh [TAG [BUILD OPTIONS...]]   default TAG: forgesyte:<workspace version>
# e.g. deploy/build-image.sh forgesyte-gpu:0.1.0 --build-arg RUNTIME_BASE=nvidia/cuda:12.8.1-runtime-ubuntu24.04
# Exit 0: built; 1: the build failed; 3: no usable podman or docker here.
set -euo pipefail
cd "$(dirname "$0")/.."
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n1)
tag=${1:-forgesyte:${version:-latest}}
shift || true
engine=
for candidate in podman docker; do
  if ! command -v "$candidate" >/dev/null 2>&1; then
    echo "build-image: $candidate is not installed" >&2
    continue
  fi
  if ! "$candidate" info >/dev/null 2>&1; then
    echo "build-image: $candidate is installed but not usable ($candidate info failed: no daemon or no permission)" >&2
    continue
  fi
  engine=$candidate
  break
done
if [ -z "$engine" ]; then
  echo "build-image: no usable podman or docker; the image was not built" >&2
  exit 3
fi
# Podman builds OCI images by default, which have no HEALTHCHECK: the
# Docker format keeps it.
format=
if [ "$engine" = podman ]; then
  format="--format docker"
fi
echo "build-image: $engine build $format $* -t $tag ." >&2
# shellcheck disable=SC2086 # $format is one option and its value, or none
"$engine" build $format "$@" -t "$tag" -f Dockerfile . || exit 1
echo "build-image: built $tag with $engine" >&2

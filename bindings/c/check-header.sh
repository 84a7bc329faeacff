#!/usr/bin/env bash
# Fails if include/switchyard.h differs from what cbindgen generates now.
# `bindings/c/check-header.sh --write` regenerates it instead.
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$root"
command -v cbindgen >/dev/null || cargo install --locked cbindgen --version '0.29.*'
tmp="$(mktemp)"
trap 'rm -f "$tmp"' EXIT
cbindgen --quiet --config bindings/c/cbindgen.toml --crate switchyard-c --output "$tmp" bindings/c
if [ "${1:-}" = "--write" ]; then
  cp "$tmp" include/switchyard.h
  exit 0
fi
if ! diff -u include/switchyard.h "$tmp"; then
  echo "include/switchyard.h is stale: run bindings/c/check-header.sh --write" >&2
  exit 1
fi

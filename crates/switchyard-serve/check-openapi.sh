#!/bin/sh
# Checks that crates/switchyard-serve/openapi.json is the document the code
# generates; with --write, regenerates it.
set -e
cd "$(dirname "$0")/../.."
if [ "$1" = "--write" ]; then
    SWITCHYARD_WRITE_OPENAPI=1 cargo test -q -p switchyard-serve --test openapi
    echo "wrote crates/switchyard-serve/openapi.json"
else
    cargo test -q -p switchyard-serve --test openapi
fi

#!/bin/sh
# Container entrypoint: check that the storage root is usable, then run the command as PID 1's
# child-free replacement (exec) so that SIGTERM reaches ichnode/celery directly.
set -eu

root="${ICHNODE_STORAGE__ROOT:-/var/lib/ichnode}"
mkdir -p "$root" 2>/dev/null || true
if [ ! -w "$root" ]; then
    # One clear line instead of a traceback loop: usually a host bind mount owned by root.
    echo "error: storage root $root is not writable by uid $(id -u); chown it to $(id -u):$(id -g)" >&2
    exit 1
fi

if [ "$#" -eq 0 ]; then
    set -- ichnode --help
fi
exec "$@"

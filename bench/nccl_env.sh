#!/usr/bin/env bash
# Sourced by the GPU scripts: `find_nccl` puts NCCL where Specula finds it (LOG_DIR holds
# the link it may make).

# NCCL: Specula (cudarc) opens libnccl.so (or libnccl.so.13, .12, ...), but the
# nvidia-nccl-cu13 wheel and most packages ship libnccl.so.2 only. Find that one (the
# library path, then the wheel in the system python3) and link it as libnccl.so.
find_nccl() {
    local lib="" dir
    for dir in ${LD_LIBRARY_PATH//:/ }; do
        [ -e "$dir/libnccl.so" ] && return 0
        [ -z "$lib" ] && [ -e "$dir/libnccl.so.2" ] && lib="$dir/libnccl.so.2"
    done
    ldconfig -p 2>/dev/null | grep -q 'libnccl\.so ' && return 0
    [ -z "$lib" ] && lib=$(ldconfig -p 2>/dev/null | awk '/libnccl\.so\.2 /{print $NF; exit}')
    if [ -z "$lib" ]; then
        dir=$(python3 -c "import importlib.util as u; print(list(u.find_spec('nvidia.nccl').submodule_search_locations)[0])" 2>/dev/null)
        [ -n "$dir" ] && [ -e "$dir/lib/libnccl.so.2" ] && lib="$dir/lib/libnccl.so.2"
    fi
    if [ -z "$lib" ]; then
        echo "libnccl.so.2 not found (library path, ldconfig, python3 -m pip show nvidia-nccl-cu13)" >&2
        return 1
    fi
    mkdir -p "$LOG_DIR/nccl-lib"
    ln -sf "$lib" "$LOG_DIR/nccl-lib/libnccl.so"
    export LD_LIBRARY_PATH="$LOG_DIR/nccl-lib:$(dirname "$lib"):$LD_LIBRARY_PATH"
    echo "NCCL: $lib (linked as $LOG_DIR/nccl-lib/libnccl.so)"
}

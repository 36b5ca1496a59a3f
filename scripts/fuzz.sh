#!/usr/bin/env bash
# Runs the fuzz targets for a fixed time each.
#
#   scripts/fuzz.sh [SECONDS] [TARGET...]
#
# SECONDS defaults to 60; TARGET defaults to every target in fuzz/. Each
# target fuzzes a temporary copy of its seed corpus (libFuzzer writes every
# new input into its corpus directory, and fuzz/corpus/ holds only the
# checked-in seeds). A crashing input is saved under fuzz/artifacts/TARGET/
# and printed in hex; the script then exits non-zero.
#
# The default AddressSanitizer build needs nightly flags; on a stable
# toolchain RUSTC_BOOTSTRAP=1 enables them. FUZZ_SANITIZER=none skips ASan.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
fuzz_dir="$root/fuzz"

seconds=${1:-60}
if ! [[ $seconds =~ ^[0-9]+$ ]] || ((seconds == 0)); then
    echo "usage: $0 [SECONDS] [TARGET...]   (SECONDS must be a positive integer)" >&2
    exit 2
fi
(($# > 0)) && shift
sanitizer=${FUZZ_SANITIZER:-address}

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "cargo-fuzz is missing: cargo install cargo-fuzz --locked" >&2
    exit 2
fi

cd "$fuzz_dir"
if (($# > 0)); then
    targets=("$@")
else
    mapfile -t targets < <(cargo fuzz list)
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/ringipc-fuzz.XXXXXX")
trap 'rm -rf "$work"' EXIT

failed=()
for target in "${targets[@]}"; do
    corpus="$work/$target"
    mkdir -p "$corpus"
    if [[ -d corpus/$target ]]; then
        cp -R "corpus/$target/." "$corpus/"
    fi
    artifacts="$fuzz_dir/artifacts/$target"
    mkdir -p "$artifacts"
    marker="$work/$target.started"
    touch "$marker"

    echo "==> fuzzing $target for ${seconds}s (sanitizer: $sanitizer)"
    # -timeout: one input may not take this long (catches hangs well before
    # -max_total_time would); -print_final_stats: execs/s for the log.
    if RUSTC_BOOTSTRAP=1 cargo fuzz run --sanitizer "$sanitizer" "$target" "$corpus" -- \
        -max_total_time="$seconds" -timeout=30 -print_final_stats=1; then
        echo "==> $target: no crash in ${seconds}s ($(find "$corpus" -type f | wc -l) corpus entries)"
    else
        failed+=("$target")
        echo "==> $target: FAILED" >&2
        while IFS= read -r -d '' crash; do
            echo "    input $crash:" >&2
            od -An -v -tx1 "$crash" | tr -d ' \n' | fold -w 96 | sed 's/^/      /' >&2
            echo >&2
        done < <(find "$artifacts" -type f -newer "$marker" -print0)
    fi
done

if ((${#failed[@]} > 0)); then
    echo "fuzzing failed: ${failed[*]}" >&2
    exit 1
fi

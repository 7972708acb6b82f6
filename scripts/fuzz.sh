#!/usr/bin/env bash
# Runs every cargo-fuzz target (fuzz/fuzz_targets/) for a set time on its kept corpus.
#
#   scripts/fuzz.sh [SECONDS] [--only a,b] [-j N] [--keep] [--record]
#
#   SECONDS     per target (default 30; CI runs 30).
#   --only      a comma-separated list of targets (default: all, as `cargo fuzz list`).
#   -j N        run N targets at once (default 1; each uses one core).
#   --keep      merge the new inputs that add coverage into fuzz/corpus/<target>/ (libFuzzer
#               -merge=1); without it they go to a scratch copy and the repository corpus
#               stays as it is (small: the repository must stay light).
#   --record    write each target's row (date, commit, exec/s, corpus, result, command) into
#               fuzz/RESULTS.md, replacing that target's previous row.
#
# Installs what it needs, no manual step: cargo-fuzz from crates.io (skipped when present)
# and a nightly toolchain (`rustup toolchain install nightly --profile minimal`). When
# nightly cannot be had (an offline CI machine), it falls back to stable with
# RUSTC_BOOTSTRAP=1, which lets stable take the -Z flags cargo-fuzz passes (sanitizer,
# sancov); that fallback was tried and builds and runs every target here (FUZZ_TOOLCHAIN=stable
# forces it). Everything is built once, in release mode with debug assertions, overflow
# checks and AddressSanitizer (cargo-fuzz's defaults; FUZZ_SANITIZER=none builds faster and
# runs ~2x faster but catches only what safe Rust panics on), then each binary runs directly.
#
# A crash (panic, sanitizer report, a unit slower than 25 s, or over 2 GB of RSS) is saved to
# fuzz/artifacts/<target>/; the script carries on with the other targets, prints how to
# reproduce each crash, and exits 1. Every crash found should become a regression test.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

seconds=30
only=""
jobs=1
keep=0
record=0
while [ $# -gt 0 ]; do
    case "$1" in
        --only) only=$2; shift 2 ;;
        --only=*) only=${1#--only=}; shift ;;
        -j) jobs=$2; shift 2 ;;
        -j*) jobs=${1#-j}; shift ;;
        --keep) keep=1; shift ;;
        --record) record=1; shift ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        [0-9]*) seconds=$1; shift ;;
        *) echo "fuzz.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
command="scripts/fuzz.sh $seconds"
[ -n "$only" ] && command+=" --only $only"
[ "$jobs" != 1 ] && command+=" -j $jobs"
[ $keep = 1 ] && command+=" --keep"
[ $record = 1 ] && command+=" --record"

say() { printf 'fuzz.sh: %s\n' "$*" >&2; }

# --- tools ------------------------------------------------------------------------------
if ! cargo fuzz --version >/dev/null 2>&1; then
    say "installing cargo-fuzz (cargo install cargo-fuzz --locked)"
    cargo install cargo-fuzz --locked
fi
toolchain=${FUZZ_TOOLCHAIN:-nightly}
if [ "$toolchain" = nightly ] && ! rustup run nightly rustc --version >/dev/null 2>&1; then
    say "installing the nightly toolchain (rustup toolchain install nightly --profile minimal)"
    rustup toolchain install nightly --profile minimal || toolchain=stable
fi
if [ "$toolchain" != nightly ]; then
    say "no nightly toolchain: using $toolchain with RUSTC_BOOTSTRAP=1"
    export RUSTC_BOOTSTRAP=1
fi
sanitizer=${FUZZ_SANITIZER:-address}
triple=$(rustc +"$toolchain" -vV | sed -n 's/^host: //p')
bin_dir=$root/fuzz/target/$triple/release

# --- build everything once ----------------------------------------------------------------
targets=$(cd fuzz && cargo +"$toolchain" fuzz list)
if [ -n "$only" ]; then
    for t in ${only//,/ }; do
        grep -qx "$t" <<<"$targets" || { say "no target $t (have: $(echo $targets))"; exit 2; }
    done
    targets=${only//,/ }
fi
started=$(date +%s)
say "building $(echo $targets | wc -w) target(s) with +$toolchain, sanitizer $sanitizer"
(cd fuzz && cargo +"$toolchain" fuzz build --sanitizer "$sanitizer")
say "built in $(($(date +%s) - started)) s"

# --- run ----------------------------------------------------------------------------------
scratch=$root/fuzz/target/scratch
logs=$root/fuzz/target/logs
mkdir -p "$logs"
dict_of() {
    case "$1" in
        policy_yaml|inventory_yaml) echo yaml ;;
        config_toml) echo toml ;;
        admin_emergency) echo json ;;
        admin_explain) echo query ;;
        socks5|socks5_udp) echo socks5 ;;
        packet_classify|packet_flow) echo packet ;;
    esac
}
run_one() {
    local t=$1 kept=$root/fuzz/corpus/$1 d
    rm -rf "${scratch:?}/$t"
    mkdir -p "$scratch/$t" "$kept" "$root/fuzz/artifacts/$t"
    local args=(-max_total_time="$seconds" -timeout=25 -rss_limit_mb=2048 -print_final_stats=1
        -artifact_prefix="$root/fuzz/artifacts/$t/")
    d=$(dict_of "$t")
    [ -n "$d" ] && args+=(-dict="$root/fuzz/dict/$d.dict")
    # New inputs go to the first directory (scratch); the kept corpus is only read.
    if "$bin_dir/$t" "${args[@]}" "$scratch/$t" "$kept" >"$logs/$t.log" 2>&1; then
        echo ok >"$logs/$t.result"
        if [ $keep = 1 ]; then
            "$bin_dir/$t" -merge=1 "$kept" "$scratch/$t" >"$logs/$t.merge.log" 2>&1
        fi
    else
        echo crash >"$logs/$t.result"
    fi
}
running=0
for t in $targets; do
    say "running $t for $seconds s"
    run_one "$t" &
    running=$((running + 1))
    if [ "$running" -ge "$jobs" ]; then
        wait -n || true
        running=$((running - 1))
    fi
done
wait

# --- summary ------------------------------------------------------------------------------
now=$(date -u '+%Y-%m-%d %H:%M')
commit=$(git rev-parse --short HEAD 2>/dev/null || echo '?')
rows=""
failed=0
printf '\n%-16s %8s %12s %8s %16s  %s\n' target seconds runs exec/s "corpus (kept)" result
for t in $targets; do
    log=$logs/$t.log
    result=$(cat "$logs/$t.result")
    runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
    eps=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)
    corp=$(grep -o 'corp: [0-9]*/[0-9]*[a-zA-Z]*' "$log" | tail -1 | sed 's/corp: //')
    kept_n=$(find "$root/fuzz/corpus/$t" -type f | wc -l)
    if [ "$result" != ok ]; then
        failed=1
        unit=$(sed -n 's/.*Test unit written to \(.*\)$/\1/p' "$log" | tail -1)
        reason=$(grep -m1 -E '^==[0-9]+==ERROR|panicked at|^==[0-9]+== ERROR|ALARM|out-of-memory' "$log" || true)
        result="CRASH ${unit#"$root"/}"
        say "$t: ${reason:-see $log}"
        say "$t: reproduce with: cargo +$toolchain fuzz run $t ${unit#"$root"/}  (from $root)"
    fi
    printf '%-16s %8s %12s %8s %16s  %s\n' "$t" "$seconds" "${runs:-?}" "${eps:-?}" \
        "${corp:-?} ($kept_n)" "$result"
    rows+="| \`$t\` | $now | $commit | $seconds | ${runs:-?} | ${eps:-?} | ${corp:-?} | $kept_n | $result | \`$command\` |"$'\n'
done
say "total $(($(date +%s) - started)) s (build + runs)"

if [ $record = 1 ]; then
    results=$root/fuzz/RESULTS.md
    if [ ! -f "$results" ]; then
        cat >"$results" <<'EOF'
# Fuzzing results

One row per target: its latest run recorded by `scripts/fuzz.sh SECONDS --record`, which
rewrites the target's row. `runs` and `exec/s` are libFuzzer's final stats; `corpus` is
libFuzzer's last status (units/bytes it held: the kept corpus plus what the run found);
`kept` the files in `fuzz/corpus/<target>/` afterwards (grows only with `--keep`).

| target | date (UTC) | commit | seconds | runs | exec/s | corpus | kept | result | command |
|---|---|---|---|---|---|---|---|---|---|
EOF
    fi
    {
        grep -v '^| `' "$results"
        { grep '^| `' "$results" | grep -v -F -f <(for t in $targets; do echo "| \`$t\` |"; done) || true
          printf '%s' "$rows"; } | sort
    } >"$results.new"
    mv "$results.new" "$results"
    say "recorded in fuzz/RESULTS.md"
fi
exit $failed

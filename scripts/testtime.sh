#!/usr/bin/env bash
# The time budget of `make test`: each tier timed, then one summary at the end.
#
#   scripts/testtime.sh start                  forget the tiers of an earlier run
#   scripts/testtime.sh run NAME CMD [ARG...]  run a tier; record its wall time and exit status
#                                              (exits with the tier's status)
#   scripts/testtime.sh summary                each tier's time, status and last pytest line,
#                                              and the total; a WARNING past the budget, and a
#                                              failure past the limit or when a tier failed
#
# Budget 25 minutes, limit 60 (CI's hard limit is 90): TESTTIME_BUDGET_S, TESTTIME_LIMIT_S.
# Records go to .cache/testtime/ (TESTTIME_DIR): tiers (NAME SECONDS STATUS a line) and a
# log of each tier's output, from which the summary takes pytest's closing line.
set -euo pipefail
cd "$(dirname "$0")/.."

DIR=${TESTTIME_DIR:-.cache/testtime}
BUDGET_S=${TESTTIME_BUDGET_S:-1500}
LIMIT_S=${TESTTIME_LIMIT_S:-3600}
TIERS=$DIR/tiers

mmss() { printf '%dm%02ds' $(($1 / 60)) $(($1 % 60)); }

case "${1:-}" in
start)
    mkdir -p "$DIR"
    rm -f "$DIR"/*.log
    : >"$TIERS"
    ;;
run)
    [ $# -ge 3 ] || { echo "usage: $0 run NAME CMD [ARG...]" >&2; exit 2; }
    name=$2
    shift 2
    mkdir -p "$DIR"
    t0=$(date +%s)
    set +e +o pipefail
    "$@" 2>&1 | tee "$DIR/$name.log"
    status=${PIPESTATUS[0]}
    set -e -o pipefail
    echo "$name $(($(date +%s) - t0)) $status" >>"$TIERS"
    exit "$status"
    ;;
summary)
    [ -s "$TIERS" ] || { echo "testtime: no tier was run" >&2; exit 1; }
    total=0; failed=(); times=()
    echo
    echo "== make test: wall time of each tier =="
    while read -r name secs status; do
        total=$((total + secs))
        times+=("$name $(mmss "$secs")")
        if [ "$status" = 0 ]; then verdict=ok; else verdict="FAILED (exit $status)"; failed+=("$name"); fi
        # pytest's closing line ("== 812 passed, 3 skipped in 700.12s ==", or under -q
        # "812 passed, 3 skipped in 700.12s (0:11:40)") if the tier has one
        last=$(grep -E '^(=+ )?[0-9]+ (passed|failed|errors?|skipped|deselected).* in [0-9.]+s' \
               "$DIR/$name.log" 2>/dev/null | tail -n 1 | tr -d '=' | sed 's/^ *//; s/ *$//' || true)
        printf '  %-12s %9s  %s%s\n' "$name" "$(mmss "$secs")" "$verdict" "${last:+   ($last)}"
    done <"$TIERS"
    printf '  %-12s %9s  (budget %s, limit %s)\n' total "$(mmss "$total")" \
        "$(mmss "$BUDGET_S")" "$(mmss "$LIMIT_S")"
    summary=$(printf '%s, ' "${times[@]}"); summary=${summary%, }
    rc=0
    if [ "$total" -gt "$LIMIT_S" ]; then
        echo "FAILED: make test took $(mmss "$total"), past the limit of $(mmss "$LIMIT_S")" \
             "($summary): make the slowest tests faster (see pytest's slowest durations above)"
        rc=1
    elif [ "$total" -gt "$BUDGET_S" ]; then
        echo "WARNING: make test took $(mmss "$total"), over the budget of $(mmss "$BUDGET_S")" \
             "($summary); it fails past $(mmss "$LIMIT_S"): see pytest's slowest durations above"
    fi
    if [ ${#failed[@]} -gt 0 ]; then
        echo "FAILED: make test: failed tier(s): ${failed[*]} ($summary)"
        rc=1
    fi
    exit "$rc"
    ;;
*)
    echo "usage: $0 start | run NAME CMD [ARG...] | summary" >&2
    exit 2
    ;;
esac

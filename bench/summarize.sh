#!/usr/bin/env bash
# Markdown summary of one or more bench/e2e.sh runs: per target the median
# req/s with its spread, median p50/p99, median proxy CPU; the ratios of the
# medians; and sessionlb/bare per round (the two run next to each other in
# every round, so this ratio is less exposed to drift of the machine).
#
# Usage: bench/summarize.sh RAW.tsv...   (several files pool their rounds)

set -euo pipefail

(($# > 0)) || {
	echo "usage: bench/summarize.sh RAW.tsv..." >&2
	exit 2
}

# All measured rows, the round prefixed with the file's index: "1:3".
ROWS=$(mktemp)
trap 'rm -f "$ROWS"' EXIT
i=0
for f in "$@"; do
	i=$((i + 1))
	awk -F'\t' -v OFS='\t' -v i="$i" '$1 ~ /^[0-9]+$/ { $1 = i ":" $1; print }' "$f"
done >"$ROWS"

TARGETS=()
for t in direct nginx haproxy bare sessionlb sessionlb-anon; do
	if awk -F'\t' -v t="$t" '$2 == t { found = 1 } END { exit !found }' "$ROWS"; then
		TARGETS+=("$t")
	fi
done
has() { [[ " ${TARGETS[*]} " == *" $1 "* ]]; }

# stats TARGET COLUMN: "median min max" of COLUMN for TARGET.
stats() {
	awk -F'\t' -v t="$1" -v c="$2" '$2 == t { print $c }' "$ROWS" | sort -g | awk '
		{ v[NR] = $1 }
		END {
			if (NR == 0) { print "NaN NaN NaN"; exit }
			m = (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2
			print m, v[1], v[NR]
		}'
}
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "n/a" }'; }

rounds=$(cut -f1 "$ROWS" | sort -u | wc -l)
settings=$(grep -m1 '^# wrk ' "$1" | sed 's/^# //')
echo "$settings; $rounds interleaved rounds$( (($# > 1)) && echo " from $# runs"). Medians over the rounds;" \
	"proxy CPU = the proxy's CPU time (all its threads and processes) in % of one core, and per request;" \
	"load core = backend + wrk."
echo
echo "| target | req/s | spread (min–max) | p50 | p99 | vs direct | proxy CPU | proxy CPU/req | load core |"
echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|"
declare -A MED
for t in "${TARGETS[@]}"; do
	read -r m lo hi < <(stats "$t" 3)
	read -r p50 _ _ < <(stats "$t" 4)
	read -r p99 _ _ < <(stats "$t" 5)
	read -r cpu _ _ < <(stats "$t" 9)
	read -r us _ _ < <(stats "$t" 10)
	read -r lc _ _ < <(stats "$t" 11)
	MED[$t]=$m
	vs=n/a
	if has direct; then
		vs="$(ratio "$m" "$(stats direct 3 | cut -d' ' -f1)")×"
	fi
	if [[ $t == direct ]]; then
		cpu_cols="– | –"
	else
		cpu_cols=$(printf '%.0f%% | %.1f µs' "$cpu" "$us")
	fi
	printf '| %s | %.0f | %.0f–%.0f | %.2f ms | %.2f ms | %s | %s | %.0f%% |\n' \
		"$t" "$m" "$lo" "$hi" "$p50" "$p99" "$vs" "$cpu_cols" "$lc"
done
echo
echo "Ratios of the median req/s:"
echo
for pair in sessionlb/bare sessionlb/nginx sessionlb/haproxy bare/nginx bare/haproxy haproxy/nginx \
	nginx/direct haproxy/direct bare/direct sessionlb/direct sessionlb-anon/sessionlb; do
	a=${pair%/*} b=${pair#*/}
	if [[ -n ${MED[$a]:-} && -n ${MED[$b]:-} ]]; then
		echo "- $pair: $(ratio "${MED[$a]}" "${MED[$b]}")"
	fi
done
if has sessionlb && has bare; then
	per_round=$(awk -F'\t' '$2 == "sessionlb" { s[$1] = $3 } $2 == "bare" { b[$1] = $3 }
		END { for (r in s) if (b[r] > 0) printf "%.2f\n", s[r] / b[r] }' "$ROWS" | sort -g)
	echo "- sessionlb/bare per round: median $(awk '{ v[NR] = $1 } END {
		printf "%.2f", (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }' <<<"$per_round")" \
		"(sorted: $(paste -sd' ' <<<"$per_round"))"
fi
if has sessionlb && has sessionlb-anon; then
	per_round=$(awk -F'\t' '$2 == "sessionlb-anon" { a[$1] = $3 } $2 == "sessionlb" { s[$1] = $3 }
		END { for (r in a) if (s[r] > 0) printf "%.2f\n", a[r] / s[r] }' "$ROWS" | sort -g)
	echo "- sessionlb-anon/sessionlb per round: median $(awk '{ v[NR] = $1 } END {
		printf "%.2f", (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }' <<<"$per_round")" \
		"(sorted: $(paste -sd' ' <<<"$per_round"))"
fi
noisy=$(awk -F'\t' '$15 == "yes"' "$ROWS" | wc -l)
other=$(awk -F'\t' '{ v = $13 + 0; if (n++ == 0 || v < lo) lo = v; if (n == 1 || v > hi) hi = v }
	END { printf "%.0f–%.0f%%", lo, hi }' "$ROWS")
echo
echo "Runs flagged noisy (a compiler running, or > 10% of a core used by other processes or stolen):" \
	"$noisy of $(wc -l <"$ROWS"); other processes used $other of one core during the runs."

#!/usr/bin/env bash
# Mutation testing with mutmut 3 (settings in pyproject.toml [tool.mutmut]). Plants small
# bugs, one at a time, in each source file and runs that file's own tests against each; a
# surviving mutant is a bug those tests would not notice. Not part of CI (it takes a while).
#
#   bench/mutation.sh                    # every target below
#   bench/mutation.sh stats plots        # only these targets
#   JOBS=2 bench/mutation.sh stats       # mutants in parallel (default 1)
#   MUTANTS="flatcli.stats.x_add_gaps__mutmut_3 ..." bench/mutation.sh stats
#                                        # only these mutants (names or globs), e.g. to
#                                        # recheck the survivors of a run after new tests
#
# Targets (source file, its test file, and optionally which functions to mutate):
#   stats       flatcli/stats.py                      tests/test_stats.py
#   correlate   flatcli/correlate.py                  tests/test_correlate.py and the
#               Ctrl-C test of tests/test_security_cli.py (the worker pool's shutdown)
#   plots       flatcli/plots.py                      tests/test_plots.py
#   pac_bayes   flatcli/measures/pac_bayes.py         tests/test_pac_bayes.py
#   theorem4    flatcli/measures/relative_flatness.py tests/test_relative_flatness.py
#               (feature_scaling, feature_std and _population_std: the Theorem-4 code)
#
# mutmut picks each mutant's tests from which tests called the mutated function in its own
# process, so code that only runs in a subprocess (correlate's worker pool, the CLI under
# test) shows as "no tests". Those mutants get a second pass here: the target's SUBPROC
# tests (default: all its tests) run with MUTANT_UNDER_TEST set, which subprocesses
# inherit; a failing run kills the mutant ("killed (subprocess)").
#
# Each target runs in a scratch copy of the working tree (mutmut writes mutants/ there),
# under $WORK/<target> ($WORK is printed); see a mutant with `cd $WORK/<target> && mutmut
# show NAME`. Prints the score and the surviving mutants of each target.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-python}
WORK=${WORK:-$(mktemp -d /tmp/flatcli-mutation.XXXXXX)}
mkdir -p "$WORK"
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
# The tests must import the mutated copy, not $PYTHONPATH's tree.
unset PYTHONPATH
command -v mutmut >/dev/null || { echo "mutmut is missing: pip install -e '.[test]'" >&2; exit 1; }

declare -A SRC=(
    [stats]=flatcli/stats.py
    [correlate]=flatcli/correlate.py
    [plots]=flatcli/plots.py
    [pac_bayes]=flatcli/measures/pac_bayes.py
    [theorem4]=flatcli/measures/relative_flatness.py
)
declare -A TESTS=(
    [stats]=tests/test_stats.py
    [correlate]="tests/test_correlate.py tests/test_security_cli.py::test_ctrl_c_stops_correlate_workers_promptly"
    [plots]=tests/test_plots.py
    [pac_bayes]=tests/test_pac_bayes.py
    [theorem4]=tests/test_relative_flatness.py
)
declare -A SUBPROC=(
    [correlate]="tests/test_correlate.py::test_two_jobs_give_the_same_table_as_one tests/test_correlate.py::test_workers_show_each_warning_on_stderr tests/test_security_cli.py::test_ctrl_c_stops_correlate_workers_promptly"
)
declare -A NAMES=(
    [theorem4]="flatcli.measures.relative_flatness.x_feature_scaling__mutmut_* flatcli.measures.relative_flatness.x_feature_std__mutmut_* flatcli.measures.relative_flatness.x__population_std__mutmut_*"
)
targets=("$@")
[ ${#targets[@]} -eq 0 ] && targets=(stats plots pac_bayes theorem4 correlate)
echo "mutation runs under $WORK"
for t in "${targets[@]}"; do
    [ -n "${SRC[$t]:-}" ] || { echo "unknown target $t (see the header of $0)" >&2; exit 2; }
    dir=$WORK/$t
    mkdir -p "$dir"
    git ls-files -z --cached --others --exclude-standard | xargs -0 cp --parents -t "$dir"
    # One source file, against its own test file(s).
    "$PY" - "$dir/pyproject.toml" "${SRC[$t]}" "${TESTS[$t]}" <<'PY'
import re, sys
path, src, tests = sys.argv[1:]
tests = ", ".join(f'"{t}"' for t in tests.split())
text = open(path).read()
text = re.sub(r"only_mutate = \[[^\]]*\]", f'only_mutate = ["{src}"]', text, count=1)
text = re.sub(r"pytest_add_cli_args_test_selection = \[[^\]]*\]",
              f'pytest_add_cli_args_test_selection = [{tests}]', text, count=1)
open(path, "w").write(text)
PY
    start=$(date +%s)
    # shellcheck disable=SC2086
    (cd "$dir" && mutmut run --max-children "${JOBS:-1}" ${MUTANTS:-${NAMES[$t]:-}} >mutmut.log 2>&1) \
        || { echo "$t: mutmut failed, see $dir/mutmut.log"; tail -5 "$dir/mutmut.log"; continue; }
    (cd "$dir" && mutmut results --all true >results.txt 2>&1) || true
    # Second pass over the "no tests" mutants (see the header).
    for m in $(sed -n 's/^ *\([^:]*\): no tests$/\1/p' "$dir/results.txt"); do
        # shellcheck disable=SC2086
        if (cd "$dir/mutants" && MUTANT_UNDER_TEST=$m timeout 900 "$PY" -m pytest -q -x \
                -p no:cacheprovider ${SUBPROC[$t]:-${TESTS[$t]}} >/dev/null 2>&1); then
            sed -i "s/^\( *$m\): no tests$/\1: survived/" "$dir/results.txt"
        else
            sed -i "s/^\( *$m\): no tests$/\1: killed (subprocess)/" "$dir/results.txt"
        fi
    done
    echo "== $t: ${SRC[$t]} against ${TESTS[$t]} ($(( $(date +%s) - start )) s)"
    "$PY" - "$dir/results.txt" <<'PY'
import collections, re, sys
counts, survivors = collections.Counter(), []
for line in open(sys.argv[1]):
    m = re.match(r"\s*(\S+): (.+)$", line)
    if m:
        counts[m.group(2).strip()] += 1
        if m.group(2).strip() == "survived":
            survivors.append(m.group(1))
tested = sum(v for k, v in counts.items() if k not in ("not checked", "skipped"))
killed = counts["killed"] + counts["timeout"] + counts["killed (subprocess)"]
print("   ", dict(counts))
print(f"    score: {killed}/{tested} killed ({100 * killed / max(1, tested):.1f}%)")
for s in survivors:
    print("    survived:", s)
PY
done

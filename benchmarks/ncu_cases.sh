#!/usr/bin/env bash
# Each kernel case of benchmarks/kernel_profile.py under Nsight Compute, with the compiler's resource report.
#
#   bash benchmarks/ncu_cases.sh OUT_DIR [CASE ...]
#
# Per case i: OUT_DIR/case<i>.txt holds the case, ptxas' report of every Mosaic GPU kernel compiled
# (registers, spills, shared memory: MOSAIC_GPU_DUMP_PTXAS=1) and ncu's sections for the second Mosaic GPU
# launch (the first is the compiling call). Clocks are left alone (--clock-control none). Each case is
# cut off after CASE_TIMEOUT_S seconds (default 120), so one that hangs loses only itself. KP_ARGS: more arguments
# of kernel_profile.py (e.g. "--tiny" for a CPU smoke run under a stand-in ncu).
set -u
out=${1:?usage: ncu_cases.sh OUT_DIR [CASE ...]}
shift
mkdir -p "$out"
ncu_bin=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
if [ -z "$ncu_bin" ]; then echo "ncu_cases.sh: no ncu on this machine" >&2; exit 2; fi
if [ $# -eq 0 ]; then
  set -- "attention:kernel_nocast" "attention:kernel:mx6" "attention:kernel:mixdit"
fi
sections="--section LaunchStats --section Occupancy --section SpeedOfLight --section WarpStateStats \
--section SchedulerStats --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis --section InstructionStats"
here=$(cd "$(dirname "$0")" && pwd)
i=0
for case in "$@"; do
  i=$((i + 1))
  f="$out/case$i.txt"
  echo "== case $i: $case" >"$f"
  # shellcheck disable=SC2086
  MOSAIC_GPU_DUMP_PTXAS=1 timeout "${CASE_TIMEOUT_S:-120}" "$ncu_bin" --clock-control none --launch-skip 1 \
    --launch-count 1 -k regex:mosaic $sections python3 "$here/kernel_profile.py" --case "$case" --repeat 2 ${KP_ARGS:-} >>"$f" 2>&1
  echo "rc $?" >>"$f"
  grep -E "^== |ptxas info|spill|Registers Per|Achieved Occupancy|Theoretical Occupancy|Duration|Block Limit|checksum|rc " "$f" | head -40
done

#!/bin/bash
# Train on a Cloud TPU VM pod slice: the same command on every worker, joined by JAX's TPU
# auto-detection (GIST_JAX_DISTRIBUTED=auto, read by gist_jax/train/distributed.py).
#
#   TPU=my-v5p-128 ZONE=us-east5-a launch/tpu_pod.sh \
#       --config experiments/llama3_8b_paper.py:fine_kv --workdir /gcs/my-bucket/runs/llama3_fine_kv \
#       --config.model.init=hf:/mnt/disks/models/Meta-Llama-3.1-8B \
#       --config.data.tokenizer=hf:/mnt/disks/models/Meta-Llama-3.1-8B
#
#   TPU=my-v5p-128 ZONE=us-east5-a launch/tpu_pod.sh setup      # once: install the venv on every worker
#   TPU=... ZONE=... launch/tpu_pod.sh stop                       # checkpoint and stop the run on every worker
#   python -m launch.sweep experiments/sweeps/paper_variants.py --print --launcher launch/tpu_pod.sh
#
# Everything after the script name goes to `python -m gist_jax.main` unchanged (quoted safely for
# the remote shell). Each worker must hold the repository at the same path (REPO_DIR) and reach
# the model and data at the same paths; the workdir must be shared (a gcsfuse-mounted bucket or a
# gs://<bucket>/<path> URL, the latter tested with one process only: docs/training.md), because
# every worker writes its shards of every checkpoint. Rerunning the same command resumes from the
# newest checkpoint; a preempted slice checkpoints and exits 0 (JAX's preemption sync point).
#
# Environment:
#   TPU       the TPU VM name (required)          ZONE     its zone (required)
#   PROJECT   GCP project (default: gcloud's)     REPO_DIR repository path on the workers (default ~/gist_jax)
#   PYTHON    interpreter on the workers, relative to REPO_DIR (default .venv/bin/python)
#   LOG       per-worker log file on the workers (default /tmp/gist_jax.log; the output also streams here)
#   PIDFILE   where each worker records the run's process id for `stop` (default /tmp/gist_jax.pid)
#   DRY_RUN=1 print the gcloud command instead of running it
#
# The repository gets onto the workers however you like, e.g. once:
#   gcloud compute tpus tpu-vm ssh $TPU --zone $ZONE --worker=all --command "git clone <your fork> ~/gist_jax"
# `setup` then runs `make install` there and adds the TPU build of jax (jax[tpu]) to the venv.

set -euo pipefail
usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 2; }
[[ $# -eq 0 || "$1" == "-h" || "$1" == "--help" ]] && usage
: "${TPU:?set TPU to the TPU VM name}"
: "${ZONE:?set ZONE to the zone of the TPU}"
REPO_DIR="${REPO_DIR:-~/gist_jax}"
PYTHON="${PYTHON:-.venv/bin/python}"
LOG="${LOG:-/tmp/gist_jax.log}"

PIDFILE="${PIDFILE:-/tmp/gist_jax.pid}"
case "$1" in
  setup)
    REMOTE='cd '"${REPO_DIR}"' && make install && '"${PYTHON}"' -m pip install -q "jax[tpu]==$('"${PYTHON}"' -c "import jax; print(jax.__version__)")" -f https://storage.googleapis.com/jax-releases/libtpu_releases.html'
    ;;
  stop)  # SIGTERM: the run saves a checkpoint at the next step and exits, as on preemption
    REMOTE="test -f ${PIDFILE} && kill -TERM \$(cat ${PIDFILE}) || echo 'no run recorded in ${PIDFILE}'"
    ;;
  *)
    ARGS=$(printf '%q ' "$@")
    REMOTE="cd ${REPO_DIR} && export GIST_JAX_DISTRIBUTED=auto GIST_JAX_INIT_TIMEOUT=\${GIST_JAX_INIT_TIMEOUT:-600} && \
{ ${PYTHON} -m gist_jax.main ${ARGS}& echo \$! > ${PIDFILE}; wait \$!; } 2>&1 | tee -a ${LOG}; exit \${PIPESTATUS[0]}"
    ;;
esac

CMD=(gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" --worker=all --command "$REMOTE")
[[ -n "${PROJECT:-}" ]] && CMD+=(--project "$PROJECT")
if [[ "${DRY_RUN:-0}" == 1 ]]; then
  printf '%q ' "${CMD[@]}"; echo
  exit 0
fi
exec "${CMD[@]}"

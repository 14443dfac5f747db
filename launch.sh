#!/usr/bin/env bash
# Experiments people edit and run. Usage: bash launch.sh <target>
#   setup   create the Python environment (.venv, or $VENV) from requirements.txt if missing
#   demo    the main job on the embedded default (the analytic image mixture): train, sample, score
#   test    the test suite
#   train | sample | evaluate | rl   the sections below; edit their flags for your experiment
set -euo pipefail
cd "$(dirname "$0")"
VENV=${VENV:-.venv}
PY="$VENV/bin/python"
GPUS=${GPUS:-1}

setup() {
  # The stamp records which requirements.txt the environment was built from, so a ready environment costs
  # nothing here (importing torch to check it takes seconds); a changed requirements.txt reinstalls.
  local stamp="$VENV/.requirements.sha256" want
  want=$(sha256sum requirements.txt | cut -d' ' -f1)
  if [ -x "$PY" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then return; fi
  if [ ! -x "$PY" ] || ! "$PY" -c "import torch, diffusers, click, omegaconf" 2>/dev/null || [ -f "$stamp" ]; then
    echo "Creating the environment in $VENV (torch and friends; a few minutes the first time)"
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q --upgrade pip
    "$VENV/bin/pip" install -q -r requirements.txt
  fi
  echo "$want" > "$stamp.tmp" && mv "$stamp.tmp" "$stamp"
}

run() {  # torchrun when more than one worker is asked for
  if [ "$GPUS" -gt 1 ]; then "$PY" -m torch.distributed.run --standalone --nproc_per_node="$GPUS" "$@"; else "$PY" "$@"; fi
}

# ---- train: distil a solver predictor ------------------------------------------------------------------------
train() {
  # Options left out come from the dataset config's train section (configs/<dataset>.yaml); set any of them here,
  # e.g. SCHEDULE_FLAGS="--schedule_type=time_uniform --schedule_rho=1", ADDITIONAL_FLAGS="--scale_dir=0.05".
  SOLVER_FLAGS="--sampler_stu=epd --num_steps=4 --afs=True --num_points=2"
  SCHEDULE_FLAGS=""
  ADDITIONAL_FLAGS=""
  GUIDANCE_FLAGS=""
  run train.py --dataset_name="${DATASET:-gmm_image}" \
    $SOLVER_FLAGS $SCHEDULE_FLAGS $ADDITIONAL_FLAGS $GUIDANCE_FLAGS "$@"
}

# ---- sample: generate images with a predictor or a classical solver -------------------------------------------
sample() {
  SOLVER_FLAGS="--sampler_stu=dpmpp --num_steps=6 --afs=False"
  SCHEDULE_FLAGS="--schedule_type=logsnr"
  ADDITIONAL_FLAGS="--max_order=3 --predict_x0=True --lower_order_final=True"
  run sample.py --dataset_name="${DATASET:-gmm_image}" --batch=64 --seeds=0-49999 \
    $SOLVER_FLAGS $SCHEDULE_FLAGS $ADDITIONAL_FLAGS "$@"
}

# ---- evaluate: FID of a folder of samples ---------------------------------------------------------------------
evaluate_args() {  # checked before setup, so a missing variable is said at once, not after loading torch
  : "${IMAGES:?set IMAGES=folder of samples}" "${REF:?set REF=reference npz or URL}"
}

evaluate() {
  run fid.py calc --images="$IMAGES" --ref="$REF" "$@"
}

# ---- rl: fine-tune a distilled EPD predictor's table against a reward (RDPO) -----------------------------------
rl() {
  # PREDICTOR: a distilled EPD predictor (folder or experiment number), e.g. from
  #   DATASET=gmm_digits bash launch.sh train --loss=rmse
  # Further overrides: OVERRIDES="ppo.kl_coef=0.01 ppo.steps=200"; extra flags (--max-steps, --dry-run) pass on.
  # CONFIG: configs/rl/{gmm_digits,ms_coco,sd3_512,sd3_1024,flux}.yaml (the reference's SD1.5, SD3 and FLUX runs;
  #   they need the model weights and reward.multi.hps.weights_path).
  CONFIG=${CONFIG:-configs/rl/gmm_digits.yaml}
  OVERRIDE_FLAGS="--override data.predictor_snapshot=${PREDICTOR:?set PREDICTOR=distilled EPD predictor}"
  for o in ${OVERRIDES:-}; do OVERRIDE_FLAGS="$OVERRIDE_FLAGS --override $o"; done
  run -m training.rl --config="$CONFIG" $OVERRIDE_FLAGS "$@"
}

demo() {
  "$PY" bench/demo.py "$@"
}

tests() {
  # One pytest worker per core (TEST_WORKERS=1 runs them in one process); the tests are single-threaded.
  "$PY" -m pytest -q -n "${TEST_WORKERS:-auto}" --dist=worksteal "$@"
}

target=${1:-demo}
shift || true
case "$target" in
  setup) setup ;;
  demo) setup; demo "$@" ;;
  test) setup; tests "$@" ;;
  train) setup; train "$@" ;;
  sample) setup; sample "$@" ;;
  evaluate) evaluate_args; setup; evaluate "$@" ;;
  rl) : "${PREDICTOR:?set PREDICTOR=distilled EPD predictor}"; setup; rl "$@" ;;
  *) echo "launch.sh: unknown target '$target'; use one of: setup demo test train sample evaluate rl" >&2; exit 2 ;;
esac

#!/bin/sh
# One pod's part of a distributed fit (torchrun, c10d rendezvous), then the model folder published into the model
# repository by the pod whose process was rank 0: exported into a hidden staging folder on the same volume (the
# service skips hidden folders) and renamed into place, so that no reader ever sees a half-written model.
#
# Mounted from a ConfigMap by training/job (an indexed Job) and training/pytorchjob (Kubeflow's PyTorchJob).
#
#   MODEL_NAME     the model folder to write, which is the served model's name
#   FIT_ARGS       `python -m training fit` arguments besides --out, e.g. "--model vae --dataset mnist5k-bin"
#   MODELS_DIR     the model repository (the PVC, mounted read-write here)
#   RUN_DIR        this pod's scratch folder for the run (checkpoint, metrics, plots)
#   NODE_INDEX     this pod's index in the job (0 on the pod that hosts the rendezvous store)
#   RDZV_ID        the same on every pod of one job, different across jobs (the job's name)
#   NNODES         pods in the job (PyTorchJob: the operator's PET_NNODES)
#   RDZV_ENDPOINT  HOST:PORT of the rendezvous: pod 0 (PyTorchJob: the operator's PET_RDZV_ENDPOINT, worker 0)
#   POD_IP         this pod's address, which the other pods use to reach it (no DNS lookup of its own name)
set -euf  # -f: no globbing of FIT_ARGS

: "${MODEL_NAME:?}" "${FIT_ARGS:?}" "${MODELS_DIR:?}" "${RUN_DIR:?}" "${NODE_INDEX:?}" "${RDZV_ID:?}"
nnodes="${NNODES:-${PET_NNODES:?NNODES or PET_NNODES must be set}}"
endpoint="${RDZV_ENDPOINT:-${PET_RDZV_ENDPOINT:?RDZV_ENDPOINT or PET_RDZV_ENDPOINT must be set}}"

# Pod 0 hosts the rendezvous store; saying so outright beats torch's guess from host names, which fails while
# pod 0's DNS record is not published yet. The timeouts give every pod time to be scheduled and pull its image.
is_host=0
if [ "$NODE_INDEX" = 0 ]; then is_host=1; fi

mkdir -p "$RUN_DIR"
# FIT_ARGS is split into words on purpose: it holds several arguments.
# shellcheck disable=SC2086
torchrun --nnodes "$nnodes" --nproc-per-node 1 \
    --rdzv-backend c10d --rdzv-endpoint "$endpoint" --rdzv-id "$RDZV_ID" \
    --rdzv-conf "is_host=$is_host,join_timeout=900,read_timeout=900" \
    ${POD_IP:+--local-addr "$POD_IP"} \
    -m training fit $FIT_ARGS --out "$RUN_DIR" --no-export --quiet

# Rank 0 alone writes the run's files, and rendezvous order decides which pod that is: the pod holding the
# checkpoint publishes, every other pod is done.
if [ ! -f "$RUN_DIR/checkpoint.pt" ]; then
    echo "train.sh: pod $NODE_INDEX: fit done; another pod holds rank 0 and publishes $MODEL_NAME"
    exit 0
fi
staging="$MODELS_DIR/.$MODEL_NAME.staging-$RDZV_ID-$NODE_INDEX"
previous="$MODELS_DIR/.$MODEL_NAME.previous-$RDZV_ID-$NODE_INDEX"
rm -rf "$staging" "$previous"
python -m training export "$RUN_DIR" --out "$staging" --name "$MODEL_NAME"
# rename(2) cannot replace a non-empty folder: the old one steps aside first, for the instant between two renames.
# -T: a folder that appeared in that instant makes the rename fail, rather than receive ours inside it.
if [ -e "$MODELS_DIR/$MODEL_NAME" ]; then
    mv -T "$MODELS_DIR/$MODEL_NAME" "$previous"
fi
mv -T "$staging" "$MODELS_DIR/$MODEL_NAME"
rm -rf "$previous"
echo "train.sh: pod $NODE_INDEX: published $MODELS_DIR/$MODEL_NAME"

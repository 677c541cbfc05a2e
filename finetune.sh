#!/bin/sh
# Full finetune of InternLM-XComposer2 with xcft (drop-in for the official finetune.sh).
#   MODEL=/path/to/internlm-xcomposer2-vl-7b DATA=/path/to/data.txt sh finetune.sh
# Multi-node: run the same command on every node with NNODES, NODE_RANK, MASTER_ADDR (and
# GPUS_PER_NODE, MASTER_PORT) set. Extra arguments are passed on to `xcft train`, e.g.
#   sh finetune.sh --num_train_epochs 2 --deepspeed configs/ds_zero3.json
# InternLM-XComposer-2.5 (internlm-xcomposer2d5-7b): the same script; xcft detects the family from the
# weights and uses --hd_num 18 and, when config.json has none, --max_length 16384 by default. The official
# 2.5 settings, explicitly:
#   MODEL=/path/to/internlm-xcomposer2d5-7b DATA=data.txt sh finetune.sh --hd_num 18 --max_length 16384 --fix_vit False
# (check the token counts first: xcft check-data data.txt --model /path/to/internlm-xcomposer2d5-7b --hd-num 18)
set -eu
export CUDA_DEVICE_MAX_CONNECTIONS=1
DIR=$(cd "$(dirname "$0")" && pwd)

MODEL=${MODEL:?set MODEL to a model folder (official checkpoint or xcft output)}
DATA=${DATA:?set DATA to a data.txt or a .json/.jsonl file}
OUTPUT=${OUTPUT:-output/finetune}
DEEPSPEED=${DEEPSPEED:-$DIR/configs/ds_zero2.json}

if [ -z "${GPUS_PER_NODE:-}" ]; then
    GPUS_PER_NODE=$(python -c "import torch; print(max(torch.cuda.device_count(), 1))" 2>/dev/null || echo 1)
fi
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-localhost}
MASTER_PORT=${MASTER_PORT:-6001}

torchrun \
    --nproc_per_node "$GPUS_PER_NODE" \
    --nnodes "$NNODES" \
    --node_rank "$NODE_RANK" \
    --master_addr "$MASTER_ADDR" \
    --master_port "$MASTER_PORT" \
    -m xcft.cli train \
    --model_name_or_path "$MODEL" \
    --data_path "$DATA" \
    --given_num True \
    --bf16 True \
    --fix_vit True \
    --fix_sampler False \
    --use_lora False \
    --output_dir "$OUTPUT" \
    --num_train_epochs 1 \
    --per_device_train_batch_size 2 \
    --per_device_eval_batch_size 2 \
    --gradient_accumulation_steps 8 \
    --eval_strategy "no" \
    --save_strategy "epoch" \
    --save_total_limit 1 \
    --learning_rate 1e-5 \
    --weight_decay 0.1 \
    --adam_beta2 0.95 \
    --warmup_steps 0.01 \
    --lr_scheduler_type "cosine" \
    --logging_steps 1 \
    --report_to "tensorboard" \
    --deepspeed "$DEEPSPEED" \
    --gradient_checkpointing True \
    "$@"

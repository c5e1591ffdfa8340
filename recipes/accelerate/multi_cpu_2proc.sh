#!/usr/bin/env bash
# Two processes on one CPU machine (gloo). accelerate's own `--cpu` flag starts a single process, so the
# multi-process launcher is asked for explicitly and the training arguments say CPU.
# Usage: bash recipes/accelerate/multi_cpu_2proc.sh --config <recipe.yaml> [--field value ...]
exec accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no --dynamo_backend no \
    -m hfkd distill --use_cpu true "$@"

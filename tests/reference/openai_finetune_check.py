#!/usr/bin/env python3
"""Drives pruneserve's Files and Fine-tuning APIs with the unmodified OpenAI Python SDK: uploads a
training file, creates a job (paper-style LoRA settings through `extra_body`), waits for it, and
reads its events and checkpoints.

stdin:  {"base_url", "training_file" (a path, also uploaded as the validation file), "model", "suffix", "extension": {...}, "timeout_s"}
stdout: JSON of what the SDK saw (the Rust test asserts on it).
"""
import json
import sys
import time

from openai import OpenAI


def main():
    cfg = json.load(sys.stdin)
    client = OpenAI(base_url=cfg["base_url"], api_key="none", max_retries=0)
    with open(cfg["training_file"], "rb") as f:
        uploaded = client.files.create(file=f, purpose="fine-tune")
    with open(cfg["training_file"], "rb") as f:
        validation = client.files.create(file=f, purpose="fine-tune")
    job = client.fine_tuning.jobs.create(
        model=cfg["model"], training_file=uploaded.id, validation_file=validation.id, suffix=cfg["suffix"], seed=7,
        method={"type": "supervised",
                "supervised": {"hyperparameters": {"batch_size": 4, "learning_rate_multiplier": 10}}},
        extra_body={"pruneserve": cfg["extension"]},
    )
    deadline = time.time() + cfg["timeout_s"]
    while job.status not in ("succeeded", "failed", "cancelled") and time.time() < deadline:
        time.sleep(0.5)
        job = client.fine_tuning.jobs.retrieve(job.id)
    events = client.fine_tuning.jobs.list_events(job.id, limit=100).data
    checkpoints = client.fine_tuning.jobs.checkpoints.list(job.id).data
    listed = [j.id for j in client.fine_tuning.jobs.list().data]
    json.dump({
        "file": {"id": uploaded.id, "purpose": uploaded.purpose, "bytes": uploaded.bytes},
        "files": [f.id for f in client.files.list().data],
        "job": job.model_dump(),
        "listed_jobs": listed,
        "events": [{"type": e.type, "message": e.message, "data": e.data} for e in events],
        "checkpoints": [{"step": c.step_number, "name": c.fine_tuned_model_checkpoint} for c in checkpoints],
        "models": [m.id for m in client.models.list().data],
    }, sys.stdout)


if __name__ == "__main__":
    main()

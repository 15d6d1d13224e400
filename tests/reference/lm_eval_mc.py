"""lm-evaluation-harness's multiple-choice metrics, as ConfigurableTask.process_results computes
them (acc = argmax of loglikelihoods == gold; acc_norm = argmax of loglikelihood / len(choice)
with len in characters of the continuation " " + choice), on loglikelihoods from a pruneval
result file. The choices come from the dataset file itself, not from pruneval.
stdin: {"data": path to arc jsonl, "result": path to pruneval result json, "limit": n}"""
import json
import sys

import numpy as np

args = json.load(sys.stdin)
rows = [json.loads(l) for l in open(args["data"]) if l.strip()][: args["limit"]]
items = json.load(open(args["result"]))["items"]
assert len(items) == len(rows), (len(items), len(rows))
acc, acc_norm = [], []
for row, item in zip(rows, items):
    lls = np.array(item["loglikelihoods"], dtype=np.float64)
    choices = [" " + c for c in row["choices"]]
    completion_len = np.array([float(len(c)) for c in choices])
    gold = row["gold"]
    acc.append(1.0 if np.argmax(lls) == gold else 0.0)
    acc_norm.append(1.0 if np.argmax(lls / completion_len) == gold else 0.0)
print(json.dumps({"acc": float(np.mean(acc)), "acc_norm": float(np.mean(acc_norm)), "n": len(acc)}))

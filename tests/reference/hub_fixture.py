"""A stand-in for the Hugging Face hub, for pruneval's hub-loading tests (no network here).

`write-cache HF_HOME DATA_DIR N` writes, with pyarrow (what `datasets` writes parquet with), the
first N rows of ../shared/data's sets converted back to their hub schemas, as parquet files on
the `refs/convert/parquet` branch of an HF cache (the layout huggingface_hub uses:
`hub/datasets--org--name/{refs,snapshots}`). Two winogrande rows are written as they are on the
hub (allenai/winogrande, winogrande_xl validation rows 0 and 1).

`serve HF_HOME` serves that cache over HTTP as the hub API does for hf-hub: the repo-info call
and `resolve` downloads with Range requests. It prints the port, then logs one line per request
to stderr.
"""

import csv
import gzip
import http.server
import json
import os
import sys
import urllib.parse

import pyarrow as pa
import pyarrow.parquet as pq

REVISION = "refs/convert/parquet"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def jsonl(path, n):
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        return [json.loads(line) for line in f if line.strip()][:n]


def write_split(hf_home, repo, config, split, rows):
    root = os.path.join(hf_home, "hub", "datasets--" + repo.replace("/", "--"))
    os.makedirs(os.path.join(root, "refs", "refs", "convert"), exist_ok=True)
    with open(os.path.join(root, "refs", REVISION), "w") as f:
        f.write(COMMIT)
    out = os.path.join(root, "snapshots", COMMIT, config, split)
    os.makedirs(out, exist_ok=True)
    # Two shards, as large splits have, when there is more than one row.
    half = max(1, len(rows) // 2)
    for i, part in enumerate([rows[:half], rows[half:]]):
        if part:
            pq.write_table(pa.Table.from_pylist(part), os.path.join(out, f"{i:04d}.parquet"))


def write_cache(hf_home, data, n):
    arc = []
    for r in jsonl(os.path.join(data, "arc/arc_easy.jsonl"), n):
        labels = ["A", "B", "C", "D", "E"][: len(r["choices"])]
        question = r["query"].removeprefix("Question: ")
        arc.append({"id": f"q{len(arc)}", "question": question,
                    "choices": {"text": r["choices"], "label": labels},
                    "answerKey": labels[r["gold"]]})
    write_split(hf_home, "allenai/ai2_arc", "ARC-Easy", "test", arc)

    piqa = [{"goal": r["query"].removeprefix("Question: ").strip(),
             "sol1": r["choices"][0], "sol2": r["choices"][1], "label": r["gold"]}
            for r in jsonl(os.path.join(data, "piqa/piqa.jsonl"), n)]
    write_split(hf_home, "ybisk/piqa", "plain_text", "validation", piqa)

    winogrande = [
        {"sentence": "Sarah was a much better surgeon than Maria so _ always got the easier cases.",
         "option1": "Sarah", "option2": "Maria", "answer": "2"},
        {"sentence": "Sarah was a much better surgeon than Maria so _ always got the harder cases.",
         "option1": "Sarah", "option2": "Maria", "answer": "1"},
    ]
    write_split(hf_home, "allenai/winogrande", "winogrande_xl", "validation", winogrande)

    for split in ["test", "dev"]:
        rows = []
        for subject in ["abstract_algebra", "anatomy"]:
            path = os.path.join(data, f"mmlu/{split}/{subject}_{split}.csv")
            with open(path, newline="") as f:
                for q, a, b, c, d, letter in list(csv.reader(f))[:n]:
                    rows.append({"question": q, "subject": subject, "choices": [a, b, c, d],
                                 "answer": "ABCD".index(letter.strip())})
        write_split(hf_home, "cais/mmlu", "all", split, rows)

    write_split(hf_home, "openai/gsm8k", "main", "test",
                jsonl(os.path.join(data, "gsm8k/test.jsonl"), n))
    write_split(hf_home, "openai/openai_humaneval", "openai_humaneval", "test",
                jsonl(os.path.join(data, "humaneval/HumanEval.jsonl.gz"), n))
    write_split(hf_home, "EleutherAI/arithmetic", "arithmetic_1dc", "validation",
                jsonl(os.path.join(data, "arithmetic/single_digit_three_ops.jsonl"), 10 * n))


def serve(hf_home):
    def snapshot(repo):
        root = os.path.join(hf_home, "hub", "datasets--" + repo.replace("/", "--"))
        with open(os.path.join(root, "refs", REVISION)) as f:
            return os.path.join(root, "snapshots", f.read().strip())

    class Hub(http.server.BaseHTTPRequestHandler):
        def log_message(self, fmt, *args):
            sys.stderr.write(f"{self.command} {urllib.parse.unquote(self.path)}\n")
            sys.stderr.flush()

        def reply(self, code, body, headers=()):
            self.send_response(code)
            for k, v in headers:
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            path = urllib.parse.unquote(self.path)
            try:
                if path.startswith("/api/datasets/"):
                    repo, _, revision = path[len("/api/datasets/"):].partition("/revision/")
                    assert revision == REVISION, revision
                    top = snapshot(repo)
                    files = sorted(os.path.relpath(os.path.join(d, f), top)
                                   for d, _, fs in os.walk(top) for f in fs)
                    body = {"id": repo, "sha": COMMIT,
                            "siblings": [{"rfilename": f} for f in files]}
                    return self.reply(200, json.dumps(body).encode(),
                                      [("Content-Type", "application/json")])
                if path.startswith("/datasets/"):
                    rest = path[len("/datasets/"):]
                    repo, _, file = rest.partition(f"/resolve/{REVISION}/")
                    with open(os.path.join(snapshot(repo), file), "rb") as f:
                        data = f.read()
                    start, _, end = self.headers.get("Range", "bytes=0-").removeprefix(
                        "bytes=").partition("-")
                    start, end = int(start), int(end) if end else len(data) - 1
                    return self.reply(206, data[start:end + 1], [
                        ("ETag", f'"{hash(data) & 0xffffffff:08x}"'),
                        ("X-Repo-Commit", COMMIT),
                        ("Content-Range", f"bytes {start}-{end}/{len(data)}")])
            except (OSError, AssertionError) as e:
                return self.reply(404, str(e).encode())
            self.reply(404, b"not found")

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hub)
    print(server.server_address[1], flush=True)
    server.serve_forever()


if __name__ == "__main__":
    if sys.argv[1] == "write-cache":
        write_cache(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    elif sys.argv[1] == "serve":
        serve(sys.argv[2])
    else:
        sys.exit(f"unknown mode {sys.argv[1]}")

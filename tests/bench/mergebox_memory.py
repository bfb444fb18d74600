"""Merge box memory: bytes per (client, document) when many clients share one publication.

    .venv/bin/python tests/bench/mergebox_memory.py                 # 1,000 clients x 1,000 docs
    .venv/bin/python tests/bench/mergebox_memory.py --clients 200 --docs 5000

One "observer" builds the published documents once (immutable field mappings, shared id
strings); every client's MergeBox then gets the same documents from one subscription and is
flushed, then every document changes once (the observer hands the new shared mapping to all
boxes) and is flushed again. Memory is what tracemalloc sees allocated by the boxes, minus the
shared documents, divided by clients x documents. A second, smaller run has two overlapping
subscriptions per client on every document (the expensive, uncommon case). The last line is
machine-readable: ``mergebox_bytes_per_doc=…`` (the single-subscription figure).
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
import tracemalloc
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from cdcddp.ddp.mergebox import Fields, MergeBox  # noqa: E402

COLLECTION = "todos"


def make_documents(count: int, fields_per_doc: int) -> dict[str, Fields]:
    return {
        f"doc{i:08d}": {f"field{k}": f"value {i} {k}" for k in range(fields_per_doc)}
        for i in range(count)
    }


def measure(
    clients: int, documents: dict[str, Fields], subs_per_client: int
) -> tuple[float, float, float]:
    """Returns (bytes per (client, doc) after the change round, adds/s, flushed ops/s)."""
    changed_docs = {doc_id: {**fields, "field0": "changed"} for doc_id, fields in documents.items()}
    gc.collect()
    tracemalloc.start()
    baseline = tracemalloc.get_traced_memory()[0]
    boxes = []
    ops = 0
    started = time.perf_counter()
    for _ in range(clients):
        box = MergeBox()
        for sub in range(subs_per_client):
            for doc_id, fields in documents.items():
                box.add(sub, COLLECTION, doc_id, fields)
        ops += len(box.flush())
        boxes.append(box)
    add_seconds = time.perf_counter() - started
    started = time.perf_counter()
    for box in boxes:
        for doc_id, fields in changed_docs.items():
            box.change(0, COLLECTION, doc_id, {"field0": "changed"}, fields_after=fields)
        ops += len(box.flush())
    change_seconds = time.perf_counter() - started
    gc.collect()
    used = tracemalloc.get_traced_memory()[0] - baseline
    tracemalloc.stop()
    pairs = clients * len(documents)
    assert all(box.document_count == len(documents) for box in boxes)
    del boxes
    return used / pairs, pairs * subs_per_client / add_seconds, ops / (add_seconds + change_seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--docs", type=int, default=1000)
    parser.add_argument("--fields", type=int, default=5)
    args = parser.parse_args()

    documents = make_documents(args.docs, args.fields)
    print(f"{args.clients} clients x {args.docs} shared docs ({args.fields} fields each)")
    per_doc, add_rate, op_rate = measure(args.clients, documents, subs_per_client=1)
    print(
        f"one subscription: {per_doc:.1f} bytes per (client, doc); "
        f"{add_rate:,.0f} adds/s, {op_rate:,.0f} flushed ops/s (under tracemalloc)"
    )
    overlap_clients = max(1, args.clients // 10)
    overlap_per_doc, _, _ = measure(overlap_clients, documents, subs_per_client=2)
    print(
        f"two overlapping subscriptions ({overlap_clients} clients): "
        f"{overlap_per_doc:.1f} bytes per (client, doc)"
    )
    print(f"mergebox_bytes_per_doc={per_doc:.1f}")


if __name__ == "__main__":
    main()

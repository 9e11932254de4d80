#!/usr/bin/env python3
"""Summarise a dhat-rs (or valgrind --tool=dhat) JSON file by allocation site.

  dhat_top.py dhat-heap.json [--metric gb|eb|tb|mb] [--top 15] [--depth 4]
              [--group]

Metrics: gb = bytes live at the global peak (t-gmax; default), eb = live at
exit, tb = total bytes allocated, mb = each site's own max live bytes.
Allocator plumbing frames (dhat, alloc::, RawVec, Box::new, bytes::BytesMut,
hashbrown...) are skipped, so the first frame shown is the real call site.
--group adds up all stacks that share that first real frame.
"""
import argparse, collections, json, re

FRAME = re.compile(r"^(?:0x[0-9a-f]+: )?(.*?)(?: \(([^()]*):(\d+):\d+\))?$")
NOISE_FILE = re.compile(
    r"dhat-|^alloc/src|^core/src|^std/src|src/raw_vec|src/vec/|src/boxed|src/sync\.rs|"
    r"src/rc\.rs|src/string\.rs|src/alloc\.rs|src/collections/|hashbrown-|bytes-\d|"
    r"src/bytes_mut\.rs|src/bytes\.rs|slab-|src/slice\.rs|src/str\.rs|src/fmt/")
NOISE_FN = re.compile(r"^(__rust|__rdl|alloc$|realloc$|allocate$|do_alloc)")

def parse(frame):
    m = FRAME.match(frame)
    fn, file, line = m.group(1), m.group(2) or "", m.group(3) or ""
    return fn, file, line

def noise(frame):
    fn, file, _ = parse(frame)
    return frame == "[root]" or bool(NOISE_FILE.search(file)) or bool(NOISE_FN.match(fn))

def short(frame):
    fn, file, line = parse(frame)
    # drop generic arguments: foo<a::b<c>> -> foo<..>
    out, depth = [], 0
    for ch in fn:
        if ch == "<":
            if depth == 0: out.append("<..>")
            depth += 1
        elif ch == ">" and depth:
            depth -= 1
        elif depth == 0:
            out.append(ch)
    fn = "".join(out)
    return f"{fn} ({file}:{line})" if file else fn

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("file")
    ap.add_argument("--metric", default="gb", choices=["gb", "eb", "tb", "mb"])
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--group", action="store_true")
    a = ap.parse_args()
    d = json.load(open(a.file))
    ftbl, pps = d["ftbl"], d["pps"]
    blk = {"gb": "gbk", "eb": "ebk", "tb": "tbk", "mb": "mbk"}[a.metric]
    total = sum(p[a.metric] for p in pps)
    print(f"{d.get('cmd', '?')}: {len(pps)} stacks; {a.metric} total {total:,} B")
    rows = collections.defaultdict(lambda: [0, 0, None])
    for p in pps:
        frames = [short(ftbl[i]) for i in p["fs"] if not noise(ftbl[i])]
        key = frames[0] if a.group and frames else id(p)
        r = rows[key]
        r[0] += p[a.metric]; r[1] += p[blk]; r[2] = r[2] or frames
    for v, n, frames in sorted(rows.values(), key=lambda r: -r[0])[: a.top]:
        print(f"{v:>12,} B {100 * v / max(total, 1):5.1f}% {n:>7,} blocks")
        for f in (frames or ["?"])[: a.depth]:
            print(f"        {f[:160]}")

main()

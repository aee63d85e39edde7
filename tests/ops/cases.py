"""The odd-shape grid of the attention tests, shared by the CPU and GPU suites."""

import itertools

PREFIX_LENS = (0, 1, 13, 64)
HEAD_DIMS = (32, 40, 64, 128)
PADDINGS = (None, "right", "left", "random")
HEADS = ((4, 4), (4, 2), (4, 1))  # MHA, GQA, MQA


def covering_grid():
    """Every (P, D) pair once, with Lq in {1, 37}, causality, padding and head layout rotated through
    so that each value of each axis meets many values of the others (a covering design, not the full
    product, which the interpreter could not afford)."""
    cases = []
    for i, (P, D) in enumerate(itertools.product(PREFIX_LENS, HEAD_DIMS)):
        len_q = (1, 37)[i % 2]
        causal = bool((i // 2) % 2)
        padding = PADDINGS[(i + i // 4) % 4]
        hq, hkv = HEADS[i % 3]
        # Lk: longer than Lq (chunked prefill / decode), equal, or shorter (causal rows with no input key).
        len_k = (53, 37, 29)[(i // 3) % 3] if len_q == 37 else 41
        cases.append(dict(batch=2, heads_q=hq, heads_kv=hkv, len_q=len_q, len_k=len_k, prefix_len=P,
                          head_dim=D, causal=causal, padding=padding))
    return cases


def case_id(c):
    pad = c["padding"] or "nopad"
    mode = "causal" if c["causal"] else "full"
    return (f"B{c['batch']}-H{c['heads_q']}x{c['heads_kv']}-Lq{c['len_q']}-Lk{c['len_k']}-P{c['prefix_len']}"
            f"-D{c['head_dim']}-{mode}-{pad}")

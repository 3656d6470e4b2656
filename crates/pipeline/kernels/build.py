"""Checks the Triton kernels of this folder on the CPU and compiles them ahead of time to cubins.

    .venv/bin/python crates/pipeline/kernels/build.py check     # interpreter vs the F64 formula
    .venv/bin/python crates/pipeline/kernels/build.py compile   # check, then cubin/ + manifest.json

`check` runs each kernel under TRITON_INTERPRET=1 (on the CPU, no GPU needed) at the head dims
and odd sequence lengths the models use, against the textbook formula in F64. `compile` writes
one cubin per kernel variant and GPU architecture (sm_80: A100/A10/L4/L40 (binary-compatible
8.x); sm_90: H100/H200) and `manifest.json`, which the Rust launcher
(`src/attention/triton.rs`) reads at build time for each variant's entry name, launch shape
(warps, shared memory) and parameter list. Cubins are committed: the CUDA build needs no Triton.
"""

import hashlib
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ARCHES = [80, 90]
# Head dim -> (BLOCK_M, BLOCK_N, warps, stages).
VARIANTS = {
    40: (64, 64, 4, 2),
    64: (64, 64, 4, 2),
    80: (64, 64, 4, 2),
    160: (64, 32, 8, 2),
}
# Queries per program: the launcher's grid is ceil(queries / BLOCK_M) x (items x heads).
PARAMS = [
    ("q_ptr", "*fp16"), ("k_ptr", "*fp16"), ("v_ptr", "*fp16"), ("out_ptr", "*fp16"),
    ("queries", "i32"), ("keys", "i32"),
    ("q_item", "i32"), ("q_row", "i32"), ("k_item", "i32"), ("k_row", "i32"),
    ("v_item", "i32"), ("v_row", "i32"), ("o_item", "i32"), ("o_row", "i32"),
    ("scale_log2e", "fp32"), ("heads", "i32"),
]
LOG2E = 1.4426950408889634
# Compiled as multiples of 16 (the launcher checks it, else it takes another kernel): the
# pointers (16-byte aligned) and the item and row strides, so loads and stores vectorise.
DIVISIBLE_BY_16 = ["q_ptr", "k_ptr", "v_ptr", "out_ptr", "q_item", "q_row", "k_item", "k_row",
                   "v_item", "v_row", "o_item", "o_row"]


def block_d(d):
    return 1 << (d - 1).bit_length()


def patch_interpreter_for_numpy_2_4():
    """Triton's interpreter turns a scalar (a one-element array) into an index with `int()`,
    which NumPy 2.4 refuses for arrays of rank 1; `.item()` takes any one-element array."""
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))

    interpreter._patch_lang_tensor = patched


def check():
    os.environ["TRITON_INTERPRET"] = "1"
    import numpy as np
    import torch

    sys.path.insert(0, HERE)
    from attention import attention_fwd

    patch_interpreter_for_numpy_2_4()
    rng = np.random.default_rng(0)
    worst = 0.0
    for d, heads, items, sq, sk in [(40, 2, 2, 70, 77), (64, 3, 1, 130, 65), (80, 2, 1, 33, 200), (160, 1, 2, 65, 77), (40, 1, 1, 1, 1)]:
        m, n, _, _ = VARIANTS[d]
        q = rng.standard_normal((items, sq, heads * d)).astype(np.float16)
        k = rng.standard_normal((items, sk, heads * d)).astype(np.float16)
        v = rng.standard_normal((items, sk, heads * d)).astype(np.float16)
        scale = d ** -0.5
        out = torch.zeros((items, sq, heads * d), dtype=torch.float16)
        tq, tk, tv = (torch.from_numpy(x) for x in (q, k, v))
        grid = ((sq + m - 1) // m, items * heads)
        attention_fwd[grid](
            tq, tk, tv, out, sq, sk,
            sq * heads * d, heads * d, sk * heads * d, heads * d, sk * heads * d, heads * d, sq * heads * d, heads * d,
            scale * LOG2E, heads,
            D=d, BLOCK_D=block_d(d), BLOCK_M=m, BLOCK_N=n,
        )
        # The formula in F64, head by head.
        split = lambda x, s: x.astype(np.float64).reshape(items, s, heads, d).transpose(0, 2, 1, 3)
        s = split(q, sq) @ split(k, sk).transpose(0, 1, 3, 2) * scale
        p = np.exp(s - s.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        expected = (p @ split(v, sk)).transpose(0, 2, 1, 3).reshape(items, sq, heads * d)
        err = np.abs(out.numpy().astype(np.float64) - expected).max() / np.abs(expected).max()
        worst = max(worst, err)
        print(f"d {d} x {heads} heads, {items} items, {sq} queries, {sk} keys: relative error {err:.2e}")
        assert err < 5e-3, f"d {d}: relative error {err}"
    print(f"all variants within 5e-3 of the F64 formula (worst {worst:.2e})")


def compile_all():
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sys.path.insert(0, HERE)
    from attention import attention_fwd

    out_dir = os.path.join(HERE, "cubin")
    os.makedirs(out_dir, exist_ok=True)
    manifest = {"triton": triton.__version__, "kernels": []}
    signature = dict(PARAMS)
    for d, (m, n, warps, stages) in VARIANTS.items():
        constexprs = {"D": d, "BLOCK_D": block_d(d), "BLOCK_M": m, "BLOCK_N": n}
        for arch in ARCHES:
            names = [name for name, _ in PARAMS]
            attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in DIVISIBLE_BY_16}
            src = ASTSource(fn=attention_fwd, signature={**signature, **{k: "constexpr" for k in constexprs}},
                            constexprs=constexprs, attrs=attrs)
            compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                                      options={"num_warps": warps, "num_stages": stages})
            # The launcher passes null for Triton's scratch pointers: the kernels must need none.
            scratch = {k: getattr(compiled.metadata, k, 0) for k in ("global_scratch_size", "profile_scratch_size")}
            assert not any(scratch.values()), f"d {d} sm_{arch} wants scratch memory: {scratch}"
            name = f"attention_d{d}_sm{arch}.cubin"
            cubin = compiled.asm["cubin"]
            with open(os.path.join(out_dir, name), "wb") as f:
                f.write(cubin)
            ptx = compiled.asm["ptx"]
            entry = compiled.metadata.name
            manifest["kernels"].append({
                "file": name,
                "head_dim": d,
                "arch": arch,
                "entry": entry,
                "block_m": m,
                "block_n": n,
                "warps": compiled.metadata.num_warps,
                "shared_bytes": compiled.metadata.shared,
                "params": [p for p, _ in PARAMS],
                "divisible_by_16": DIVISIBLE_BY_16,
                "ptx_params": ptx_params(ptx, entry),
                "sha256": hashlib.sha256(cubin).hexdigest(),
            })
            print(f"{name}: entry {entry}, {compiled.metadata.num_warps} warps, "
                  f"{compiled.metadata.shared} bytes shared, {len(cubin)} bytes")
    with open(os.path.join(HERE, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
        f.write("\n")
    return manifest


def ptx_params(ptx, entry):
    """The entry's parameter types as the PTX declares them: the launcher passes exactly these
    (the kernel's own parameters, then what Triton appends)."""
    start = ptx.index(f".entry {entry}(")
    body = ptx[start:ptx.index(")", start)]
    return [line.split()[1] for line in body.splitlines()[1:] if line.strip().startswith(".param")]


if __name__ == "__main__":
    what = sys.argv[1] if len(sys.argv) > 1 else "check"
    if what == "check":
        check()
    elif what == "compile":
        subprocess.run([sys.executable, __file__, "check"], check=True)
        compile_all()
    else:
        raise SystemExit(f"unknown command {what!r}: check or compile")

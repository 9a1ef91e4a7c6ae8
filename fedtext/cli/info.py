"""`fedtext info`: the CPU features found, the recurrence kernel chosen, threads and versions."""

from __future__ import annotations

import json


def register(sub) -> None:
    p = sub.add_parser("info", help="show the CPU features, RNN kernel, threads and versions",
                       description="Which compiled RNN kernel variant (avx512, avx2, neon, "
                       "scalar) runs on this machine and why; FEDTEXT_KERNEL forces one, "
                       "FEDTEXT_NO_KERNEL=1 disables it.")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=info_cmd)


def info_cmd(args) -> int:
    from fedtext.model.kernel import kernel_info

    info = kernel_info()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    if info["kernel"]:
        kernel = info["kernel"] + (" (forced by FEDTEXT_KERNEL)" if info["kernel_forced"] else "")
    elif info["kernel_forced"] and info["kernel_forced"] not in info["variants_runnable"]:
        kernel = (f"none: FEDTEXT_KERNEL={info['kernel_forced']} is refused here "
                  f"({info['kernel_unavailable']})")
    else:
        kernel = f"none ({info['kernel_unavailable']}): the pure-PyTorch recurrences run"
    if info["bf16_kernel"]:
        bf16 = "native bf16 dot products: --precision bf16 runs on the kernel"
    elif info["bf16_native"]:
        bf16 = "the CPU has bf16 dot products, but this kernel does not use them"
    else:
        bf16 = "no native bf16 dot products: --precision bf16 is refused"
    rows = [("cpu", f"{info['cpu']} ({info['machine']})"),
            ("features", " ".join(info["cpu_features"]) or "none found"),
            ("kernel", kernel),
            ("runnable", ", ".join(info["variants_runnable"])),
            ("bf16", bf16),
            ("threads", f"{info['threads']}" + (f" ({info['kernel_threading']})"
                                                   if info["kernel_threading"] else "")),
            ("torch", info["torch"]),
            ("compiler", info["compiler"] or "none found")]
    for name, value in rows:
        print(f"{name + ':':10s}{value}")
    return 0

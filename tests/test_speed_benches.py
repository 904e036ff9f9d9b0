"""The speed benches at a tiny size (bundled tiny models, one small round): they run and print their figures in
the documented form. Timing is never asserted; the README has the full-size figures."""
from __future__ import annotations

import re

import test_benches as benches  # its run_bench (a module import: its tests are not collected twice)


def run_bench(script: str, *args: str) -> list[str]:
    return benches.run_bench(script, *args, timeout=300)


def test_pipeline_bench_prints_the_precision_and_profile_lines():
    lines = run_bench("pipeline.py", "--tiny")
    assert re.fullmatch(r"batched/naive speedup: \d+\.\dx", lines[-1]), lines[-1]
    for pattern in (r"default vs fp32 end-to-end speedup: \d+\.\dx",
                    r"cpu profile: \d+\.\d\d images/s, \d+\.\dx the fp32 default",
                    r"detector stage \w+ \w+ vs fp32: \d+\.\dx; CLIP stage: \d+\.\dx",
                    r"interactive box -> label: \d+ ms .*",
                    r"peak RSS, one process with the default models: \d+\.\d\d GiB",
                    r"CLIP embeddings \w+ \w+ vs fp32: mean centred cosine [01]\.\d{4} .*"):
        assert any(re.fullmatch(pattern, line) for line in lines[:-1]), (pattern, lines)
    if any(line.startswith("detector stage openvino") for line in lines):   # the default runtime here (a bf16 CPU)
        for pattern in (r"default vs torch \w+ end-to-end speedup: \d+\.\dx; "
                        r"detector stage \d+\.\dx, CLIP stage \d+\.\dx",
                        r"peak RSS on a first start \(converting to OpenVINO\): \d+\.\d\d GiB"):
            assert any(re.fullmatch(pattern, line) for line in lines[:-1]), (pattern, lines)


def test_detectors_bench_lists_the_cpu_profile_candidates():
    lines = run_bench("detectors.py", "--tiny")
    assert re.fullmatch(r"cpu profile \(ssdlite320_mobilenet_v3_large\) vs default \(R50-FPN v2\) detector speed-up, "
                        r"both \w+: \d+\.\dx", lines[-1]), lines[-1]
    assert any(line.startswith("| ssdlite320_mobilenet_v3_large | own |") and "| 21.3 |" in line for line in lines)


def test_gpu_bench_runs_here_too():
    """On a machine without CUDA it compares fp32 with the CPU's own default precision."""
    lines = run_bench("gpu.py", "--tiny")
    assert lines[0].startswith("models: tiny CLIP"), lines
    assert any(re.fullmatch(r"fp32: end to end \d+\.\d\d images/s; .* crops/s; peak GPU memory .* GiB", line)
               for line in lines), lines


def test_runtimes_bench_prints_the_table():
    lines = run_bench("runtimes.py", "--tiny")
    rows = [line for line in lines if re.fullmatch(r"\| .+ \| torch .+ \| \d+ \| \d+\.\d\dx \| -?[01]\.\d{4} \|", line)]
    assert len(rows) == 11, lines   # 4 variants per CLIP tower, 3 for the detector's backbone (no Linear layers)
    for runtime in ("onnxruntime", "openvino"):   # installed by requirements(-test).txt: two rows per part each
        assert sum(f"| {runtime} " in line for line in lines) == 6, lines

"""MNIST-sized runs on the dashboard (issue 19): 28×28 reconstructions and a 16-dimensional latent
space, beside the 8×8 digits runs the other tests use.

The run is a copy of a real tiny digits run whose recon.parquet / latents.parquet are rewritten
with the shapes ``diffenc evaluate`` writes for MNIST (784-pixel rows, height = width = 28).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from streamlit.testing.v1 import AppTest

REPO = Path(__file__).resolve().parents[2]
APP = REPO / "dashboard" / "app.py"
SIDE, N_RECON, LATENT_DIM, N_TEST = 28, 6, 16, 200


@pytest.fixture(scope="module")
def mnist_runs(runs_dir, tmp_path_factory) -> Path:
    """A runs folder with ``mnist28`` (the fake MNIST-sized run) and the real ``diff_digits``."""
    root = tmp_path_factory.mktemp("mnist") / "runs"
    shutil.copytree(runs_dir / "diff_digits", root / "diff_digits", ignore=shutil.ignore_patterns("checkpoints"))
    run = root / "mnist28"
    shutil.copytree(runs_dir / "diff_digits", run, ignore=shutil.ignore_patterns("checkpoints"))
    rng = np.random.default_rng(0)
    x = (rng.random((N_RECON, SIDE * SIDE)) > 0.7).astype(np.float32)
    noisy = np.clip(x + rng.normal(0, 0.1, x.shape), 0, 1).astype(np.float32)
    pd.DataFrame({
        "index": np.arange(N_RECON), "label": np.arange(N_RECON) % 10, "height": SIDE, "width": SIDE,
        "x": list(x), "recon_amortised": list(noisy), "recon_refined": list(noisy * 0.9 + x * 0.1),
        "mse_amortised": ((noisy - x) ** 2).mean(1), "mse_refined": ((noisy * 0.9 - x * 0.9) ** 2).mean(1),
    }).to_parquet(run / "recon.parquet")
    z = rng.normal(size=(N_TEST, LATENT_DIM))
    lat = pd.DataFrame({"index": np.arange(N_TEST), "label": np.arange(N_TEST) % 10})
    for i in range(LATENT_DIM):
        lat[f"z{i}"], lat[f"mean_z{i}"] = z[:, i], z[:, i] * 0.8
    lat.to_parquet(run / "latents.parquet")
    metrics = json.loads((run / "metrics.json").read_text())
    for key in ("latent_mean", "latent_var", "latent_var_of_mean"):
        metrics.pop(key, None)  # computed from latents.parquet instead: 16 dimensions
    metrics.update(dataset="mnist", latent_dim=LATENT_DIM)
    (run / "metrics.json").write_text(json.dumps(metrics))
    return root


def page(root: Path, view: str, compare: list[str]) -> AppTest:
    at = AppTest.from_file(str(APP), default_timeout=90)
    at.session_state["runs_dir"] = str(root)
    at.session_state["compare"] = compare
    at.run()
    at.switch_page(view).run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def test_28x28_reconstructions_are_drawn_as_images(mnist_runs):
    at = page(mnist_runs, "views/reconstructions.py", ["mnist28"])
    assert not at.warning, [w.value for w in at.warning]
    assert len(at.image) == N_RECON * 3  # original, amortised, refined for each test image
    captions = [img.proto.imgs[0].caption for img in at.image]
    assert sum(c.startswith("mse ") for c in captions) == N_RECON * 2 and "#0 · label 0" in captions


def test_28x28_beside_8x8_in_groups(mnist_runs):
    at = page(mnist_runs, "views/reconstructions.py", ["mnist28", "diff_digits"])
    assert "different test examples" in "\n".join(i.value for i in at.info)
    assert len(at.image) == 2 * N_RECON * 3 and len(at.get("plotly_chart")) == 2


def test_image_of_keeps_28x28_square():
    from dashboard.figures import image_of

    img = image_of(np.linspace(0, 1, SIDE * SIDE), SIDE, SIDE, target=96)
    assert img.shape == (84, 84) and img[0, 0] == 0 and img[-1, -1] == 255  # 3× nearest upscaling, row-major


def test_16_dimensional_latents(mnist_runs):
    at = page(mnist_runs, "views/latents.py", ["mnist28"])
    charts = at.get("plotly_chart")
    assert len(charts) == 3 + 1 + 1  # per-dimension statistics, a histogram, the 2-D view (PCA)
    assert at.selectbox[0].options == [f"z{i}" for i in range(LATENT_DIM)]
    assert any("PCA" in json.loads(c.proto.spec)["layout"]["title"]["text"] for c in charts)


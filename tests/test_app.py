"""The Gradio app on the tiny model: API calls with gradio_client, load, and a real browser."""
from __future__ import annotations

import concurrent.futures as cf
import os
import shutil
import socket
import zipfile
from pathlib import Path

import numpy as np
import pytest

from cxrcommon.imageio import read_dicom, read_png_text, write_png

CHROMIUM = "/usr/bin/chromium"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    import app
    cfg = app.AppConfig(model=str(tiny_model_dir), port=_free_port(), concurrency=2, max_file_size="5mb")
    demo = app.launch(cfg, prevent_thread_lock=True, quiet=True)
    yield f"http://127.0.0.1:{cfg.port}/", demo
    demo.close()


@pytest.fixture(scope="module")
def client(server):
    from gradio_client import Client
    return Client(server[0], verbose=False)


def _xray_with_text(path: Path) -> Path:
    import cv2
    img = np.full((256, 256), 60, np.uint8)
    cv2.circle(img, (128, 140), 80, 150, -1)
    cv2.putText(img, "PORTABLE", (20, 40), cv2.FONT_HERSHEY_SIMPLEX, 1.0, 255, 2)
    cv2.putText(img, "R", (220, 240), cv2.FONT_HERSHEY_SIMPLEX, 0.9, 255, 2)
    write_png(path, img.astype(np.float32) / 255)
    return path


def test_binds_loopback_by_default():
    import app
    assert app.AppConfig().host == "127.0.0.1"


def test_sliders_start_at_the_embedded_models_measured_best(tiny_model_dir):
    import app
    from cxrcommon.models import EMBEDDED_DIR
    assert app.slider_defaults("embedded") == app.slider_defaults(str(EMBEDDED_DIR)) == (20, 2.0)
    assert app.slider_defaults(str(tiny_model_dir)) == (30, 4.0)


def test_api_generate_returns_marked_images_and_reusable_seed(client):
    gallery, files, seed = client.predict("Moderate left pleural effusion.", "", 2, 4.0, "ddim", 1234, 2, False,
                                          api_name="/generate")
    assert seed == 1234 and len(gallery) == 2
    pngs = [Path(f) for f in files if str(f).endswith(".png")]
    dcms = [Path(f) for f in files if str(f).endswith(".dcm")]
    assert len(pngs) == 2 and len(dcms) == 2
    tags = read_png_text(pngs[0])
    assert tags["synthetic"] == "true" and tags["prompt"] == "Moderate left pleural effusion." and tags["seed"]
    arr, ds = read_dicom(dcms[0])
    assert "DERIVED" in ds.ImageType and "SYNTHETIC" in ds.DerivationDescription
    again = client.predict("Moderate left pleural effusion.", "", 2, 4.0, "ddim", 1234, 1, False, api_name="/generate")
    first = next(Path(f) for f in again[1] if str(f).endswith(".png"))
    assert first.read_bytes() != b"" and read_png_text(first)["seed"] == tags["seed"]


def test_the_generate_tab_counts_tokens_and_windows_of_the_typed_report(client):
    findings = ("FINDINGS: The patient is status post median sternotomy and CABG. There is a left-sided dual-lead "
                "pacemaker with leads terminating in the right atrium and right ventricle. The cardiac silhouette "
                "is mildly enlarged. Mediastinal and hilar contours are unremarkable. There is mild pulmonary "
                "vascular congestion without frank interstitial edema. No pneumothorax.")
    assert client.predict("Small left effusion.", api_name="/report_length") == \
        "5 CLIP tokens = 1 window(s) of 75: encoded whole"
    long = client.predict(findings + " IMPRESSION: Large left pleural effusion.", api_name="/report_length")
    assert long.startswith("90 CLIP tokens = 2 window(s) of 75: encoded whole (the stock pipeline")
    huge = client.predict(f"{findings} {findings} {findings} IMPRESSION: Effusion.", api_name="/report_length")
    assert huge.startswith("over 3 windows of 75 tokens: cut to") and "Encoded: IMPRESSION: Effusion. FINDINGS:" in huge


def test_api_generate_bad_input_is_a_message_not_a_trace(client):
    from gradio_client.exceptions import AppError
    with pytest.raises(AppError, match="type a report first"):
        client.predict("  ", "", 2, 4.0, "ddim", 1, 1, False, api_name="/generate")


def test_api_clean_erases_text_and_keeps_marker(client, tmp_path):
    from gradio_client import handle_file
    src = _xray_with_text(tmp_path / "film.png")
    annotated, cleaned, mask, files, table = client.predict(handle_file(str(src)), True, False, api_name="/clean")
    texts = {row[0].upper(): row[2] for row in table["data"]} if isinstance(table, dict) else {}
    assert any("PORTABLE" in t for t in texts), table
    assert [a for t, a in texts.items() if "PORTABLE" in t] == ["erased"]
    m = np.asarray(__import__("PIL.Image", fromlist=["Image"]).open(mask)) > 0
    assert m.any() and m[:60].any() and not m[200:, 200:].any()  # PORTABLE masked, the R marker kept


def test_api_clean_bad_upload(client, tmp_path):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(AppError, match="broken.png"):
        client.predict(handle_file(str(bad)), True, False, api_name="/clean")


def test_api_clean_deidentifies_a_dicom(client, tmp_path):
    import pydicom
    from gradio_client import handle_file
    from test_deidentify import PHI_FILM, PID, film, phi_dataset
    src = tmp_path / "film.dcm"
    phi_dataset(film(PHI_FILM)).save_as(src, enforce_file_format=True)
    _, _, _, files, _ = client.predict(handle_file(str(src)), True, True, api_name="/clean")
    out = pydicom.dcmread(next(f for f in files if f.endswith(".dcm")))
    assert out.PatientIdentityRemoved == "YES" and PID.encode() not in Path(out.filename).read_bytes()


def test_uploads_over_the_size_limit_are_refused(server, tmp_path):
    """The server (max_file_size 5mb here) refuses a 6 MB upload before it reaches any handler."""
    import httpx
    url = server[0] + "gradio_api/upload"
    small = httpx.post(url, files={"files": ("ok.png", b"x" * 1000)}, timeout=60)
    assert small.status_code == 200
    big = httpx.post(url, files={"files": ("big.png", b"x" * 6_000_000)}, timeout=60)
    assert big.status_code == 413, (big.status_code, big.text[:200])


def test_api_batch_zip_has_images_and_manifest(client, tmp_path):
    from gradio_client import handle_file
    prompts = tmp_path / "p.txt"
    prompts.write_text("Small right pleural effusion.\nNo acute cardiopulmonary process.\n")
    archive, summary = client.predict(handle_file(str(prompts)), 2, 2, 4.0, 0, "png", api_name="/batch")
    with zipfile.ZipFile(archive) as zf:
        names = zf.namelist()
    assert "manifest.jsonl" in names and sum(n.endswith(".png") for n in names) == 4


def test_api_evaluate_reports_n_and_backbone(client, tmp_path):
    from gradio_client import handle_file
    rng = np.random.default_rng(0)
    sets = []
    for name in ("real", "fake"):
        z = tmp_path / f"{name}.zip"
        with zipfile.ZipFile(z, "w") as zf:
            for i in range(6):
                p = write_png(tmp_path / f"{name}{i}.png", rng.random((32, 32), dtype=np.float32))
                zf.write(p, p.name)
        sets.append([handle_file(str(z))])
    md, js = client.predict(sets[0], sets[1], "tiny", api_name="/evaluate")
    assert "FID" in md and "6 real" in md and "tiny" in md


def test_twenty_concurrent_generates_all_succeed(server):
    from gradio_client import Client

    def one(i):
        c = Client(server[0], verbose=False)
        return c.predict(f"Case {i}: small left pleural effusion.", "", 1, 2.0, "ddim", i, 1, False,
                         api_name="/generate")

    with cf.ThreadPoolExecutor(max_workers=20) as pool:
        results = list(pool.map(one, range(20), timeout=300))
    assert [r[2] for r in results] == list(range(20)) and all(len(r[0]) == 1 for r in results)


@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="Debian chromium not installed (scripts/test.sh installs it)")
def test_browser_generate_and_clean(server, tmp_path):
    from playwright.sync_api import sync_playwright
    url = server[0]
    shots = Path(os.environ.get("SYNTHCXR_SCREENSHOTS", tmp_path))
    src = _xray_with_text(tmp_path / "upload.png")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run", "--disable-quic"])
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(url)
        page.get_by_label("Report").fill("Large right pleural effusion.")
        page.get_by_role("button", name="Generate").click()
        page.locator("[data-testid='detailed-image'], .gallery-item img, .thumbnail-item img").first.wait_for(timeout=120_000)
        page.screenshot(path=str(shots / "app_generate.png"), full_page=True)
        page.get_by_role("tab", name="Clean").click()
        page.locator("input[type=file]").first.set_input_files(str(src))
        page.get_by_role("button", name="Clean", exact=True).click()
        page.get_by_text("PORTABLE").first.wait_for(timeout=120_000)
        page.screenshot(path=str(shots / "app_clean.png"), full_page=True)
        browser.close()
    assert (shots / "app_generate.png").stat().st_size > 10_000

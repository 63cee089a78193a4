"""The Gradio app on the tiny model: API calls with gradio_client, load, and a real browser."""
from __future__ import annotations

import concurrent.futures as cf
import os
import re
import socket
import tempfile
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
    # the tiny model's card names no demographics template: the app is told which form to write a patient in
    cfg = app.AppConfig(model=str(tiny_model_dir), port=_free_port(), concurrency=2, max_file_size="5mb",
                        demographics_template="roentgen")
    demo = app.launch(cfg, prevent_thread_lock=True, quiet=True)
    yield f"http://127.0.0.1:{cfg.port}/", demo
    demo.close()


@pytest.fixture(scope="module")
def client(server):
    from gradio_client import Client
    return Client(server[0], verbose=False)


def _xray_with_text(path: Path, seed: int | None = None) -> Path:
    import cv2
    img = np.full((256, 256), 60, np.uint8)
    if seed is not None:   # a little noise: bytes no other test sends
        img += np.random.default_rng(seed).integers(0, 3, img.shape, dtype=np.uint8)
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


def test_the_generate_tab_previews_the_caption_and_records_the_patient(client):
    """sex/age/race fill the template live (the CLI's caption) and reach every image's tags."""
    assert client.predict("Small left effusion.", "F", 71, "WHITE", api_name="/caption") == \
        "Caption (roentgen form): `71 year old WHITE female. Small left effusion.`"
    assert client.predict("Small left effusion.", "", None, "", api_name="/caption") == \
        "Caption: `Small left effusion.`"
    assert "age 250 is not an age" in client.predict("x", "F", 250, "", api_name="/caption")
    _, files, _ = client.predict("Small left effusion.", "", 2, 2.0, "ddim", 3, 1, False, "male", 95, "asian",
                                 api_name="/generate")
    tags = read_png_text(next(Path(f) for f in files if str(f).endswith(".png")))
    assert (tags["sex"], tags["age"], tags["race"]) == ("M", "95", "ASIAN")
    assert tags["prompt"] == "90+ year old ASIAN male. Small left effusion."


@pytest.mark.parametrize("sex, age, race, match", [("F", -3, "", "age -3 is not"), ("F", 250, "", "age 250 is not"),
                                                   ("X", 40, "", "sex 'X' is not one the template knows")])
def test_a_bad_patient_is_one_line_and_nothing_is_written(server, client, sex, age, race, match):
    from gradio_client.exceptions import AppError
    sessions = server[1].synthcxr_root / "sessions"
    before = {p for p in sessions.rglob("*")} if sessions.exists() else set()
    with pytest.raises(AppError, match=match) as err:
        client.predict("Small left effusion.", "", 2, 2.0, "ddim", 3, 1, False, sex, age, race, api_name="/generate")
    assert "\n" not in str(err.value)
    assert not [p for p in sessions.rglob("prompts.jsonl") if p not in before]


def test_a_model_without_a_form_refuses_the_fields_and_its_card_names_the_form(tiny_model_dir, tmp_path):
    import shutil

    import app
    plain = app.Services(app.AppConfig(model=str(tiny_model_dir)))
    assert plain.caption_form is None
    assert app.caption_preview(plain, "Effusion.") == "Caption: `Effusion.`"
    assert "names no demographics template" in app.caption_preview(plain, "Effusion.", "F", 40, "")
    with pytest.raises(ValueError, match="start the app with --demographics-template roentgen"):
        app.generate_images(plain, tmp_path / "s", "Effusion.", "", 2, 2.0, "ddim", 1, 1, False, "F", 40, "")
    assert not (tmp_path / "s").exists()
    carded = tmp_path / "carded"
    shutil.copytree(tiny_model_dir, carded, copy_function=os.symlink)
    (carded / "README.md").write_text("---\nsynthcxr:\n  demographics_template: chexgen\n---\n")
    assert app.caption_preview(app.Services(app.AppConfig(model=str(carded))), "Effusion.", "F", 40.0, "") == \
        "Caption (chexgen form): `sex:Female, age:40.0. Effusion.`"


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


def test_api_batch_accepts_the_patient_columns(client, tmp_path):
    import json

    from gradio_client import handle_file
    prompts = tmp_path / "p.csv"
    prompts.write_text("prompt,sex,age,race\nSmall right pleural effusion.,F,34,BLACK\nNo acute process.,,,\n")
    archive, _ = client.predict(handle_file(str(prompts)), 1, 2, 2.0, 0, "png", api_name="/batch")
    with zipfile.ZipFile(archive) as zf:
        rows = [json.loads(line) for line in zf.read("manifest.jsonl").decode().splitlines()]
    assert sorted(((r["sex"], r["age"], r["race"]) for r in rows), key=str) == [("F", 34, "BLACK"),
                                                                                 (None, None, None)]
    assert {r["prompt"] for r in rows} == {"34 year old BLACK female. Small right pleural effusion.",
                                           "No acute process."}


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
        page.get_by_label("Age in years (optional)").fill("71")
        page.get_by_text("71 year old patient. Large right pleural effusion.").wait_for(timeout=30_000)  # live
        page.get_by_role("button", name="Generate").click()
        page.locator("[data-testid='detailed-image'], .gallery-item img, .thumbnail-item img").first.wait_for(
            timeout=120_000)
        page.screenshot(path=str(shots / "app_generate.png"), full_page=True)
        page.get_by_role("tab", name="Clean").click()
        page.locator("input[type=file]").first.set_input_files(str(src))
        page.get_by_role("button", name="Clean", exact=True).click()
        page.get_by_text("PORTABLE").first.wait_for(timeout=120_000)
        page.screenshot(path=str(shots / "app_clean.png"), full_page=True)
        browser.close()
    assert (shots / "app_generate.png").stat().st_size > 10_000


# --- issue #24: no PHI at rest, no server path to a client --------------------------------------

def _modes(root: Path) -> dict[str, set[str]]:
    """Permission bits of every folder and file under `root` (root included)."""
    found: dict[str, set[str]] = {"dirs": {oct(root.stat().st_mode & 0o777)}, "files": set()}
    for p in root.rglob("*"):
        found["dirs" if p.is_dir() else "files"].add(oct(p.lstat().st_mode & 0o777))
    return found


def _phi_upload(tmp_path: Path) -> Path:
    from test_deidentify import PHI_FILM, PHI_NAME, film, phi_dataset
    src = tmp_path / PHI_NAME                      # a patient-named file, as real exports are
    phi_dataset(film(PHI_FILM)).save_as(src, enforce_file_format=True)
    return src


def test_uploads_and_derived_files_lie_in_the_apps_private_folder(server, client, tmp_path):
    """Gradio's upload/cache folder is the app's 0700 root; every file in it is 0600, every folder 0700."""
    from gradio_client import handle_file
    from test_deidentify import PHI_NAME
    root = server[1].synthcxr_root
    client.predict(handle_file(str(_phi_upload(tmp_path))), True, True, api_name="/clean")
    client.predict("Small left effusion.", "", 2, 2.0, "ddim", 5, 1, False, api_name="/generate")
    assert os.environ["GRADIO_TEMP_DIR"] == str(root)
    uploads = list(root.rglob(PHI_NAME))
    assert uploads and all(p.parent.parent == root for p in uploads)   # gradio's <sha>/<name>, in the root
    modes = _modes(root)
    assert modes == {"dirs": {"0o700"}, "files": {"0o600"}}, modes


def test_a_deidentifying_clean_shows_the_cleaned_image_never_the_original(client, tmp_path):
    from gradio_client import handle_file
    from PIL import Image

    from cxrcommon.imageio import read_image

    def gray(path):  # whatever format the view came in
        return np.asarray(Image.open(path).convert("L"), np.float32) / 255

    src = _phi_upload(tmp_path)
    annotated, cleaned, _, files, _ = client.predict(handle_file(str(src)), True, True, api_name="/clean")
    base, original = gray(annotated["image"]), read_image(src)
    assert np.abs(base - gray(cleaned)).max() < 1 / 255 + 1e-6
    assert np.abs(base - original)[:80, :250].max() > 0.2            # the name and ID are not in the view
    # without de-identification the boxes are still drawn on the original (what was found, where)
    annotated, cleaned, _, _, _ = client.predict(handle_file(str(src)), True, False, api_name="/clean")
    assert np.abs(gray(annotated["image"]) - original).max() < 1 / 255 + 1e-6


def test_error_messages_name_the_file_never_a_server_path(client, tmp_path):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError
    bad = tmp_path / "broken.dcm"
    bad.write_bytes(b"DICM" * 40)
    with pytest.raises(AppError) as err:
        client.predict(handle_file(str(bad)), True, True, api_name="/clean")
    msg = str(err.value)
    assert "broken.dcm" in msg and not re.search(r"/\S*broken\.dcm", msg), msg
    assert tempfile.gettempdir() not in msg, msg


def test_hide_paths_keeps_names_words_and_urls():
    import app
    assert app.hide_paths("/tmp/gradio/ab12/broken.dcm: cannot read") == "broken.dcm: cannot read"
    assert app.hide_paths("cannot open '/srv/x/DOE JOHN.dcm'") == "cannot open 'DOE JOHN.dcm'"
    assert app.hide_paths("/tmp/s/p.csv:3: no prompt") == "p.csv:3: no prompt"
    assert app.hide_paths(r"C:\Users\me\a.png is broken") == "a.png is broken"
    words = "write real/synthetic, see https://hf.co/x/y"
    assert app.hide_paths(words) == words


def test_images_and_the_page_name_the_model_by_name_and_hash_not_its_folder(server, client, tiny_model_dir):
    import httpx

    from cxrcommon.provenance import model_fingerprint
    _, files, _ = client.predict("Small left effusion.", "", 2, 2.0, "ddim", 7, 1, False, api_name="/generate")
    tags = read_png_text(next(Path(f) for f in files if str(f).endswith(".png")))
    assert "model_path" not in tags
    assert tags["model"] == tiny_model_dir.name and tags["model_sha256"] == model_fingerprint(tiny_model_dir)
    assert re.fullmatch(r"prompts\.jsonl:\d+", tags["prompt_source"])
    leaks = {k: v for k, v in tags.items() if "/" in v and k not in ("prompt", "warning")}
    assert not leaks, leaks
    _, dcm = read_dicom(next(Path(f) for f in files if str(f).endswith(".dcm")))
    assert str(tiny_model_dir) not in str(dcm) and str(server[1].synthcxr_root) not in str(dcm)
    page = httpx.get(server[0] + "config", timeout=60).text
    assert tiny_model_dir.name in page and str(tiny_model_dir) not in page
    assert str(server[1].synthcxr_root) not in page


def test_a_sessions_uploads_and_outputs_go_when_it_ends(server, tmp_path):
    """A client that disconnects (a closed tab) loses its folder and its uploads at once."""
    import time

    from gradio_client import Client, handle_file
    root = server[1].synthcxr_root
    src = _xray_with_text(tmp_path / "DOE_JANE_778899.png", seed=os.getpid())      # bytes no other session sent
    c = Client(server[0], verbose=False)
    c.predict(handle_file(str(src)), True, False, api_name="/clean")
    mine = {p.parent for p in root.glob(f"*/{src.name}")}       # gradio's <sha>/<name> upload folder
    sessions = set((root / "sessions").iterdir())
    assert mine
    c.close()
    deadline = time.time() + 30
    while time.time() < deadline and (any(d.exists() for d in mine) or set((root / "sessions").iterdir()) >= sessions):
        time.sleep(0.2)
    assert not any(d.exists() for d in mine)
    assert not set((root / "sessions").iterdir()) >= sessions   # the closed session's folder went


def test_sessions_remove_their_uploads_unless_another_open_session_sent_them(tmp_path):
    import types

    import app
    up = tmp_path / "gradio"
    a_file, shared = up / "aaa" / "DOE_JOHN.dcm", up / "sss" / "x.png"
    for f in (a_file, shared):
        f.parent.mkdir(parents=True)
        f.write_bytes(b"x")
    sessions = app.Sessions(up / "sessions", uploads=up)
    a, b = types.SimpleNamespace(session_hash="a1"), types.SimpleNamespace(session_hash="b2")
    sessions.adopt(a, [str(a_file), str(shared)])
    sessions.adopt(b, str(shared))
    sessions.adopt(b, str(tmp_path / "elsewhere.png"))     # not an upload: never touched
    sessions.close(a)
    assert not a_file.parent.exists() and shared.exists()
    sessions.close(b)
    assert not shared.parent.exists()


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_stopping_the_app_removes_uploads_and_its_folder(tiny_model_dir, tmp_path, sig):
    """`python app.py` stopped by SIGTERM (a service manager) or Ctrl-C leaves nothing on disk."""
    import signal
    import subprocess
    import sys
    import time

    import httpx
    tmp, port = tmp_path / "tmp", _free_port()
    tmp.mkdir()
    env = {**os.environ, "TMPDIR": str(tmp), "GRADIO_ANALYTICS_ENABLED": "False"}
    env.pop("GRADIO_TEMP_DIR", None)
    proc = subprocess.Popen([sys.executable, "app.py", "--model", str(tiny_model_dir), "--port", str(port)],
                            cwd=Path(__file__).resolve().parent.parent, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        url, deadline = f"http://127.0.0.1:{port}/", time.time() + 180
        while time.time() < deadline:
            try:
                if httpx.get(url + "config", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        up = httpx.post(url + "gradio_api/upload", files={"files": ("DOE_JOHN.png", b"x" * 100)}, timeout=60)
        [path] = map(Path, up.json())
        roots = list(tmp.glob("synthcxr-app-*"))
        assert len(roots) == 1 and path.is_file() and path.is_relative_to(roots[0])
        proc.send_signal(getattr(signal, sig))
        out = proc.communicate(timeout=60)[0].decode(errors="replace")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, out[-2000:]
    assert not list(tmp.iterdir()), list(tmp.rglob("*"))      # neither the upload nor the app's folder

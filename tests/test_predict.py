"""scripts/predict.py: files, folders, globs and URLs; every bad input reported, the rest predicted."""

from __future__ import annotations

import csv
import io
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import labelled_image
from PIL import Image
from test_evaluate import trained_run

from cifar_lightning.checkpoint import load_classifier
from cifar_lightning.inference import predict_logits
from cifar_lightning.predict import Limits, expand_inputs, predict_main
from cifar_lightning.predict import decode_input as decode_image

MAX_BYTES = 50_000  # small limits keep the oversize cases small
MAX_PIXELS = 1_000_000
TIMEOUT = 0.5  # for the slow servers only: a loaded test machine can take longer for the others
GENEROUS_TIMEOUT = 30.0


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return trained_run(tmp_path_factory)


def png_bytes(img: np.ndarray | Image.Image) -> bytes:
    buf = io.BytesIO()
    (img if isinstance(img, Image.Image) else Image.fromarray(img)).save(buf, format="PNG")
    return buf.getvalue()


PNG = png_bytes(labelled_image(2, np.random.default_rng(1)))


class Handler(BaseHTTPRequestHandler):
    """/ok.png, /page.html, /big-announced.png, /big-streamed.png, /stalls.png, /drips.png, /missing.png"""

    def do_GET(self):
        if self.path == "/stalls.png":  # no answer within the client's timeout
            time.sleep(3 * TIMEOUT)
        if self.path in ("/ok.png", "/stalls.png"):
            return self.reply(200, "image/png", PNG)
        if self.path == "/page.html":
            return self.reply(200, "text/html", b"<html><body>not a picture</body></html>")
        if self.path == "/big-announced.png":
            return self.reply(200, "image/png", b"\0" * (2 * MAX_BYTES))
        if self.path == "/big-streamed.png":  # no Content-Length: the cap must hold while reading
            return self.reply(200, "image/png", b"\0" * (2 * MAX_BYTES), length=False)
        if self.path == "/drips.png":  # a byte at a time: each read is quick, the whole is not
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.end_headers()
            for byte in PNG[:40]:
                self.wfile.write(bytes([byte]))
                self.wfile.flush()
                time.sleep(TIMEOUT / 4)
            return None
        return self.reply(404, "text/plain", b"no")

    def reply(self, code: int, ctype: str, body: bytes, length: bool = True):
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        if length:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def handle(self):
        try:
            super().handle()
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client hung up at its size cap or deadline, as it should

    def log_message(self, *args):  # keep the test output clean
        pass


@pytest.fixture(scope="module")
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/x.png"  # nothing listens there any more: connection refused


@pytest.fixture
def inputs(tmp_path):
    """Good inputs of several kinds, and one bad input of each kind with the reason it must report."""
    rng = np.random.default_rng(0)
    good = {
        "big-rgba": Image.fromarray(rng.integers(0, 255, (120, 90, 4), dtype=np.uint8), "RGBA"),
        "gray-jpeg": Image.fromarray(rng.integers(0, 255, (40, 50), dtype=np.uint8), "L"),
    }
    good_paths = []
    for name, img in good.items():
        path = tmp_path / (f"{name}.jpg" if img.mode == "L" else f"{name}.png")
        img.save(path)
        good_paths.append(str(path))
    folder = tmp_path / "folder" / "nested"
    folder.mkdir(parents=True)
    for i in range(2):
        Image.fromarray(labelled_image(i, rng)).save(folder / f"{i}.png")
    (folder / "notes.txt").write_text("not picked up from a folder")
    globbed = tmp_path / "glob"
    globbed.mkdir()
    for i in range(3):
        Image.fromarray(labelled_image(i, rng)).save(globbed / f"g{i}.png")
    (tmp_path / "empty").mkdir()
    (tmp_path / "text.png").write_text("hello, I am text")
    (tmp_path / "truncated.png").write_bytes(png_bytes(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))[:300])
    Image.new("RGB", (1500, 1000), "white").save(tmp_path / "huge.png")  # 1.5 MP, a few KB
    (tmp_path / "heavy.png").write_bytes(png_bytes(rng.integers(0, 255, (200, 200, 3), dtype=np.uint8)))
    bad = {
        str(tmp_path / "missing.png"): "no such file or folder",
        str(tmp_path / "nomatch-*.png"): "the pattern matches no files",
        str(tmp_path / "empty"): "the folder holds no image files",
        str(tmp_path / "text.png"): "not an image",
        str(tmp_path / "truncated.png"): "truncated or corrupt image",
        str(tmp_path / "huge.png"): "the image is 1500x1000 = 1,500,000 pixels, over the limit of 1,000,000",
        str(tmp_path / "heavy.png"): "bytes, over the limit of 50,000",
    }
    expanded = [str(folder / "0.png"), str(folder / "1.png"), *[str(globbed / f"g{i}.png") for i in range(3)]]
    return {
        "args": [*good_paths, str(tmp_path / "folder"), str(globbed / "g*.png"), *bad],
        "good": good_paths + expanded,
        "bad": bad,
    }


def limits_args(out: Path, timeout: float = GENEROUS_TIMEOUT) -> list[str]:
    return [
        "--format",
        "json",
        "--output",
        str(out),
        "--max-bytes",
        str(MAX_BYTES),
        "--max-pixels",
        str(MAX_PIXELS),
        "--timeout",
        str(timeout),
        "--top-k",
        "3",
    ]


def assert_one_error_line_each(err: str, bad: dict[str, str]) -> None:
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == len(bad), err
    for name, reason in bad.items():
        (line,) = [e for e in errors if e.startswith(f"error: {name}: ")]
        assert reason in line, line


def test_every_bad_input_is_reported_and_the_rest_predicted(run, inputs, server, tmp_path, capsys):
    urls_bad = {
        f"{server}/page.html": "not an image (the server sent text/html)",
        f"{server}/big-announced.png": f"the server sends {2 * MAX_BYTES:,} bytes, over the limit of {MAX_BYTES:,}",
        f"{server}/big-streamed.png": f"the download exceeds the limit of {MAX_BYTES:,} bytes",
        f"{server}/missing.png": "the server answered HTTP 404",
        closed_port_url(): "unreachable (",
    }
    out = tmp_path / "pred.json"
    code = predict_main([str(run[0]), *inputs["args"], f"{server}/ok.png", *urls_bad, *limits_args(out)])
    assert code == 1
    err = capsys.readouterr().err
    bad = {**inputs["bad"], **urls_bad}
    assert_one_error_line_each(err, bad)
    assert f"{len(bad)} of {len(bad) + len(inputs['good']) + 1} input(s) failed" in err

    results = {r["input"]: r for r in json.loads(out.read_text())}
    good = [*inputs["good"], f"{server}/ok.png"]
    assert set(results) == set(good) | set(bad)  # the .txt file in the folder is not an input
    for name in good:
        r = results[name]
        assert r["error"] is None and len(r["predictions"]) == 3
        probs = [p["probability"] for p in r["predictions"]]
        assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6
        assert {p["class"] for p in r["predictions"]} <= {"cat", "dog", "frog", "ship"}
    for name in bad:
        assert results[name]["predictions"] == [] and results[name]["error"]


def test_slow_servers_time_out_and_the_rest_is_predicted(run, server, tmp_path, capsys):
    # One server never answers in time; the other answers at once but drips the body, so every
    # read is quick and only a deadline for the whole download stops it.
    slow = {f"{server}/{name}.png": f"timed out after {TIMEOUT:g} s" for name in ("stalls", "drips")}
    good = str(run[1] / "test" / "cat" / "001.png")
    out = tmp_path / "pred.json"
    assert predict_main([str(run[0]), *slow, good, *limits_args(out, timeout=TIMEOUT)]) == 1
    assert_one_error_line_each(capsys.readouterr().err, slow)
    results = {r["input"]: r for r in json.loads(out.read_text())}
    assert results[good]["error"] is None and len(results[good]["predictions"]) == 3


def test_predictions_equal_evaluation_on_the_same_images(run, tmp_path, capsys):
    ckpt, data = run
    files = sorted((data / "test").rglob("*.png"))[:9]
    out = tmp_path / "p.csv"
    assert predict_main([str(ckpt), *map(str, files), "--output", str(out), "--top-k", "2"]) == 0
    rows = list(csv.DictReader(out.open()))
    assert list(rows[0]) == ["input", "class_1", "probability_1", "class_2", "probability_2", "error"]
    assert [r["input"] for r in rows] == list(map(str, files))
    module = load_classifier(ckpt)
    images = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])
    probs = torch.softmax(predict_logits(module, images), dim=1)
    for row, p in zip(rows, probs):
        assert row["class_1"] == module.class_names[int(p.argmax())]
        assert float(row["probability_1"]) == pytest.approx(float(p.max()), abs=1e-6)
    assert "error:" not in capsys.readouterr().err


def test_table_goes_to_stdout_with_every_input(run, capsys, monkeypatch):
    ckpt, data = run
    monkeypatch.chdir(data / "test")  # short relative names fit the 80 columns of a pipe
    files = sorted(str(p) for p in Path("frog").glob("*.png"))
    assert predict_main([str(ckpt), *files, "--top-k", "9"]) == 0  # more than 4 classes: all 4 shown
    out = capsys.readouterr().out
    assert "top 4" in out and "top 5" not in out
    for f in files:
        assert f in out


def test_expand_inputs_keeps_order_without_repeats(tmp_path):
    for name in ("b.png", "a.jpg", "c.PNG"):
        Image.new("RGB", (8, 8)).save(tmp_path / name)
    entries = expand_inputs([str(tmp_path / "b.png"), str(tmp_path), str(tmp_path / "*.jpg")])
    assert [e.input for e in entries] == [str(tmp_path / n) for n in ("b.png", "a.jpg", "c.PNG")]
    assert all(e.error is None for e in entries)


def test_decode_image_converts_and_resizes():
    img = Image.fromarray(np.full((300, 200, 4), 200, dtype=np.uint8), "RGBA")
    arr = decode_image(png_bytes(img), Limits())
    assert arr.shape == (32, 32, 3) and arr.dtype == np.uint8 and (arr == 200).all()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--top-k", "0"], "argument --top-k: must be positive, got 0"),
        (["--timeout", "-1"], "argument --timeout: must be positive, got -1"),
        (["--max-bytes", "lots"], "argument --max-bytes: expected a positive int, got 'lots'"),
        (["--device", "tpu:7"], "unknown device 'tpu:7'"),
    ],
)
def test_bad_options_exit_2(run, args, message, capsys):
    with pytest.raises(SystemExit) as exc:
        predict_main([str(run[0]), "x.png", *args])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="the machine has a GPU, so --device cuda is valid")
def test_cuda_without_gpu_exits_2(run, capsys):
    with pytest.raises(SystemExit) as exc:
        predict_main([str(run[0]), "x.png", "--device", "cuda"])
    assert exc.value.code == 2
    assert "no CUDA GPU" in capsys.readouterr().err


def test_json_output_keeps_non_ascii_names_readable(run, tmp_path):
    image = tmp_path / "große Katze ü.png"
    image.write_bytes(png_bytes(labelled_image(0, np.random.default_rng(1))))
    out = tmp_path / "pred.json"
    assert predict_main([str(run[0]), str(image), "--format", "json", "--output", str(out)]) == 0
    text = out.read_text(encoding="utf-8")
    assert "große Katze ü.png" in text and "\\u00fc" not in text
    assert json.loads(text)[0]["input"] == str(image)

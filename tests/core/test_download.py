"""`d2m weights download` against a real HTTP server on loopback: resume, corrupt files, dropped connections."""

from __future__ import annotations

import hashlib
import io
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from d2m_core.compute.download import Download, DownloadError, download_missing, fetch, planned_downloads
from d2m_core.config import parse_config


class FileServer:
    """Serves `files` by name, honouring Range; `drop_after[name] = n` cuts the first n requests' bodies
    halfway (headers promise the whole file, then the connection closes)."""

    def __init__(self, files: dict[str, bytes]) -> None:
        self.files = files
        self.drop_after: dict[str, int] = {}
        self.requests: list[tuple[str, str | None]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                name = self.path.lstrip("/")
                server.requests.append((name, self.headers.get("Range")))
                body = server.files.get(name)
                if body is None:
                    self.send_error(404)
                    return
                start = int(self.headers["Range"].split("=")[1].rstrip("-")) if self.headers.get("Range") else 0
                self.send_response(206 if start else 200)
                self.send_header("Content-Length", str(len(body) - start))
                self.end_headers()
                if server.drop_after.get(name, 0) > 0:
                    server.drop_after[name] -= 1
                    self.wfile.write(body[start: start + (len(body) - start) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body[start:])

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> FileServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server() -> Iterator[FileServer]:
    body = bytes(range(256)) * 4096  # 1 MiB
    with FileServer({"model.bin": body, "other-0b549669.ckpt": b"x" * 1000}) as srv:
        yield srv


def _item(server: FileServer, name: str = "model.bin", sha256: str | None = None) -> Download:
    body = server.files[name]
    return Download("m", name, f"{server.url}/{name}", sha256 or hashlib.sha256(body).hexdigest(), "the test server")


def test_fetch_verifies_and_moves_into_place(server: FileServer, tmp_path: Path) -> None:
    path = fetch(_item(server), tmp_path, progress=False)
    assert path == tmp_path / "model.bin" and path.read_bytes() == server.files["model.bin"]
    assert not (tmp_path / "model.bin.part").exists()


def test_dropped_connection_resumes_with_range(server: FileServer, tmp_path: Path) -> None:
    server.drop_after["model.bin"] = 2
    path = fetch(_item(server), tmp_path, progress=False)
    assert path.read_bytes() == server.files["model.bin"]
    ranges = [r for name, r in server.requests if name == "model.bin"]
    assert ranges[0] is None and all(r is not None and r.startswith("bytes=") for r in ranges[1:]) and len(ranges) == 3


def test_interrupted_part_is_resumed_by_the_next_command(server: FileServer, tmp_path: Path) -> None:
    body = server.files["model.bin"]
    (tmp_path / "model.bin.part").write_bytes(body[:1000])
    fetch(_item(server), tmp_path, progress=False)
    assert (tmp_path / "model.bin").read_bytes() == body
    assert server.requests == [("model.bin", "bytes=1000-")]


def test_corrupt_file_is_refused_and_deleted(server: FileServer, tmp_path: Path) -> None:
    with pytest.raises(DownloadError, match="sha256 .* expected 0{64}: deleted"):
        fetch(_item(server, sha256="0" * 64), tmp_path, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_hash_prefix_in_the_name_is_checked(server: FileServer, tmp_path: Path) -> None:
    item = Download("m", "other-0b549669.ckpt", f"{server.url}/other-0b549669.ckpt", None, "src")
    with pytest.raises(DownloadError, match="expected 0b549669..."):
        fetch(item, tmp_path, progress=False)


def test_server_that_keeps_dropping_fails_and_keeps_the_part(server: FileServer, tmp_path: Path) -> None:
    server.drop_after["model.bin"] = 10
    with pytest.raises(DownloadError, match="failed 2 times .* run the command again to resume"):
        fetch(_item(server), tmp_path, progress=False, attempts=2)
    assert 0 < (tmp_path / "model.bin.part").stat().st_size < len(server.files["model.bin"])


def test_registry_files_from_a_mirror(server: FileServer, tmp_path: Path) -> None:
    """The weights entries' own pins: a mirror serving the wrong bytes for ViT-B-32.pt is refused, a missing
    file is one line, and files already present are not fetched again."""
    server.files["ViT-B-32.pt"] = b"not the OpenAI checkpoint"
    models = ["oai-clip-vit-b32", "nsfw-image-oai-clip-vit-l-14"]
    plan = planned_downloads(models, tmp_path, server.url, data_files=["fasttext"])
    assert [(d.filename, d.url) for d in plan] == [("lid.176.bin", f"{server.url}/lid.176.bin"),
                                                   ("ViT-B-32.pt", f"{server.url}/ViT-B-32.pt"),
                                                   ("nsfw_torch.pt", f"{server.url}/nsfw_torch.pt")]
    config = parse_config({"models": models, "nworkers": 1, "batch_size": 1, "device": "cpu", "input_tars": "/x.tar",
                           "output_metadata_dir": "/out"})
    out = io.StringIO()
    failures = download_missing(config, str(tmp_path), base_url=server.url, out=out)
    assert len(failures) == 2 and len(out.getvalue().splitlines()) == 3
    assert "ViT-B-32.pt gave a file with sha256" in failures[0] and "40d36571" in failures[0]
    assert "HTTP 404" in failures[1] and "nsfw_torch.pt" in failures[1]
    (tmp_path / "ViT-B-32.pt").write_bytes(b"present")
    assert [d.filename for d in planned_downloads(["oai-clip-vit-b32"], tmp_path, server.url, [])] == []
    assert planned_downloads(["faces-scrfd10g"], tmp_path, None, [])[0].url.endswith("/scrfd_10g.pt")
    wordnet = planned_downloads([], tmp_path, None, ["wordnet"])[0]
    with pytest.raises(DownloadError, match="wordnet.zip has no download source: get it from NLTK.s wordnet corpus"):
        fetch(wordnet, tmp_path, progress=False)

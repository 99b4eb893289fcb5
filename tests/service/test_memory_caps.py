"""Memory amplification caps (issue 19, item 8), with real crafted files over a real server.

- an .npz of deflated zeros whose arrays inflate to 1 GiB: 413 naming max_dataset_bytes, read
  from the npy headers, so the API process's peak memory does not grow by the inflated size;
- the element cap (uint8 arrays become float32): 413 naming max_dataset_elements;
- a .pt weights file (a torch.save zip) whose storage member inflates to 1 GiB: 413 naming
  max_weights_bytes, read from the zip directory, so the API does not inflate it either; a legacy
  (non-zip) torch.save file: 422; a real .pt / .safetensors over a small cap: 413;
- a JSON POST /models gets the normal body limit, not the upload limit;
- a fault map with more entries than max_faults_per_map: 422 naming the setting, per bulk line too.
"""

from __future__ import annotations

import io
import json
import struct
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from accelerator.data import npz_arrays

pytestmark = pytest.mark.integration

GIB = 1 << 30


def deflated_zeros_npz(path: Path, arrays: dict[str, tuple[tuple[int, ...], str]]) -> Path:
    """An .npz whose arrays are all zeros, written in chunks: GiBs of array in a few MiB of file."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        for name, (shape, dtype) in arrays.items():
            header = io.BytesIO()
            np.lib.format.write_array_header_1_0(
                header, {"descr": np.dtype(dtype).str, "fortran_order": False, "shape": shape}
            )
            total = int(np.prod(shape)) * np.dtype(dtype).itemsize
            with zf.open(f"{name}.npy", "w", force_zip64=True) as f:
                f.write(header.getvalue())
                chunk = bytes(16 << 20)
                for start in range(0, total, len(chunk)):
                    f.write(chunk[: min(len(chunk), total - start)])
    return path


def bomb_pt(path: Path, inflated: int) -> Path:
    """A torch.save zip of {'w': a float32 tensor of `inflated` bytes}, its storage record
    deflated zeros: a few MiB that torch.load allocates and inflates to `inflated` bytes. Made
    from the real file of a 4-float tensor, its pickle's sizes patched (protocol 2: no framing)."""
    import torch

    src = io.BytesIO()
    torch.save({"w": torch.zeros(4)}, src)
    numel = struct.pack("<i", inflated // 4)
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            data = zin.read(info)
            if info.filename.endswith("/data.pkl"):  # the storage's numel, then the tensor's shape
                patched = data.replace(b"q\x06K\x04t", b"q\x06J" + numel + b"t", 1)
                patched = patched.replace(b"K\x00K\x04\x85", b"K\x00J" + numel + b"\x85", 1)
                assert patched.count(numel) == 2, data
                zout.writestr(info, patched)
            elif info.filename.endswith("/data/0"):
                member = zipfile.ZipInfo(info.filename)
                member.compress_type = zipfile.ZIP_DEFLATED  # one deflated member in a stored archive
                with zout.open(member, "w", force_zip64=True) as f:
                    chunk = bytes(16 << 20)
                    for start in range(0, inflated, len(chunk)):
                        f.write(chunk[: min(len(chunk), inflated - start)])
            else:
                zout.writestr(info, data)
    return path


def _peak_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


def _register(c: Any, accelerator: str, name: str, npz: bytes) -> Any:
    fields = {"name": name, "architecture": "mlp", "dataset": "mine", "accelerator": accelerator, "train": "true"}
    return c.post("/api/v1/models", data=fields, files={"dataset_file": ("mine.npz", npz)})


@pytest.fixture(scope="module")
def gib_npz(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    shapes = {"x_train": ((GIB // 4 // 64, 1, 8, 8), "<f4"), "y_train": ((GIB // 4 // 64,), "<i8")}
    shapes |= {"x_test": ((10, 1, 8, 8), "<f4"), "y_test": ((10,), "<i8")}
    path = deflated_zeros_npz(tmp_path_factory.mktemp("npz") / "bomb.npz", shapes)
    assert path.stat().st_size < 8 << 20  # a few MiB on the wire
    return path.read_bytes()


def test_npz_arrays_reads_headers_only(tmp_path: Path, gib_npz: bytes) -> None:
    path = tmp_path / "bomb.npz"
    path.write_bytes(gib_npz)
    arrays = {a.name: a for a in npz_arrays(path)}
    assert arrays["x_train"].nbytes == GIB and arrays["x_train"].shape == (GIB // 256, 1, 8, 8)
    # a header that claims more than its zip entry holds is refused, not trusted
    lie = io.BytesIO()
    with zipfile.ZipFile(lie, "w") as zf:
        header = io.BytesIO()
        np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False, "shape": (GIB,)})
        zf.writestr("x_train.npy", header.getvalue() + bytes(64))
    (tmp_path / "lie.npz").write_bytes(lie.getvalue())
    with pytest.raises(ValueError, match="header states"):
        npz_arrays(tmp_path / "lie.npz")


def test_an_npz_inflating_to_a_gib_is_413_before_it_is_inflated(
    service: Any, accelerator: str, uid: str, gib_npz: bytes
) -> None:
    assert service.api is not None
    with service.client() as c:
        # first a file refused by the same check, so that the API's imports are not counted below
        assert _register(c, accelerator, f"bomb-{uid}", b"not a zip").status_code == 422
        before = _peak_rss_kib(service.api.popen.pid)
        r = _register(c, accelerator, f"bomb-{uid}", gib_npz)
        assert r.status_code == 413, r.text
        assert "max_dataset_bytes" in r.json()["detail"] and r.json()["errors"][0]["loc"] == ["body", "dataset_file"]
        assert c.get(f"/api/v1/models/bomb-{uid}").status_code == 404  # nothing registered
    grown_mib = (_peak_rss_kib(service.api.popen.pid) - before) / 1024
    assert grown_mib < 200, f"the API's peak RSS grew by {grown_mib:.0f} MiB"


def _register_weights(c: Any, accelerator: str, name: str, filename: str, weights: bytes) -> Any:
    fields = {"name": name, "architecture": "mlp", "dataset": "digits", "accelerator": accelerator}
    return c.post("/api/v1/models", data=fields, files={"weights": (filename, weights)})


def test_weights_file_bytes_reads_the_zip_directory_only(tmp_path: Path) -> None:
    import torch

    from accelerator.zoo import weights_file_bytes

    bomb = bomb_pt(tmp_path / "bomb.pt", GIB)
    assert bomb.stat().st_size < 8 << 20 and weights_file_bytes(bomb) > GIB
    with zipfile.ZipFile(bomb) as zf:  # what a reader would allocate: the declared size, not the file's
        assert max(i.file_size / max(i.compress_size, 1) for i in zf.infolist()) > 500
    torch.save({"w": torch.zeros(4)}, tmp_path / "ok.pt")
    assert weights_file_bytes(tmp_path / "ok.pt") < 4096
    torch.save({"w": torch.zeros(4)}, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    with pytest.raises(ValueError, match="legacy"):
        weights_file_bytes(tmp_path / "legacy.pt")


def test_a_pt_inflating_to_a_gib_is_413_before_it_is_inflated(
    service: Any, accelerator: str, uid: str, tmp_path: Path
) -> None:
    import torch

    assert service.api is not None
    bomb = bomb_pt(tmp_path / "bomb.pt", GIB).read_bytes()
    legacy = io.BytesIO()
    torch.save({"w": torch.zeros(4)}, legacy, _use_new_zipfile_serialization=False)
    with service.client() as c:
        # first, so that the API has imported torch and loaded digits before its peak is taken
        r = _register_weights(c, accelerator, f"ptbomb-{uid}", "w.pt", legacy.getvalue())
        assert r.status_code == 422 and "legacy" in r.json()["detail"], r.text
        before = _peak_rss_kib(service.api.popen.pid)
        for filename in ("w.pt", "w.pth"):
            r = _register_weights(c, accelerator, f"ptbomb-{uid}", filename, bomb)
            assert r.status_code == 413, r.text
            detail = r.json()["detail"]
            assert "max_weights_bytes" in detail and "FAULTFLEET_MAX_WEIGHTS_BYTES" in detail, detail
            assert r.json()["errors"][0]["loc"] == ["body", "weights"]
        assert c.get(f"/api/v1/models/ptbomb-{uid}").status_code == 404  # nothing registered
    grown_mib = (_peak_rss_kib(service.api.popen.pid) - before) / 1024
    assert grown_mib < 200, f"the API's peak RSS grew by {grown_mib:.0f} MiB"


def test_a_json_model_registration_has_the_normal_body_limit(service: Any, accelerator: str, uid: str) -> None:
    body = {"name": f"big-{uid}", "architecture": "mlp", "dataset": "digits", "accelerator": accelerator}
    raw = json.dumps({**body, "train": True, "pad": "x" * (2 << 20)}).encode()  # 2 MiB: over 1 MiB, under 256
    with service.client() as c:
        r = c.post("/api/v1/models", content=raw, headers={"Content-Type": "application/json"})
        assert r.status_code == 413 and str(1 << 20) in r.json()["detail"], r.text


@pytest.fixture(scope="module")
def capped(ff_tools: Any, tmp_path_factory: pytest.TempPathFactory) -> Any:
    caps = {
        "FAULTFLEET_MAX_FAULTS_PER_MAP": "50",
        "FAULTFLEET_MAX_DATASET_BYTES": str(4 << 20),
        "FAULTFLEET_MAX_DATASET_ELEMENTS": str(1 << 20),
        "FAULTFLEET_MAX_WEIGHTS_BYTES": str(64 << 10),
    }
    with ff_tools.running_service("embedded", tmp_path_factory.mktemp("capped"), **caps) as svc:
        with svc.client() as c:
            r = c.post("/api/v1/accelerators", json={"name": "cap32", "rows": 32, "cols": 32})
            assert r.status_code == 201, r.text
        yield svc


def test_faults_per_map_cap_is_a_422_naming_it(capped: Any, ff_tools: Any) -> None:
    at_cap = ff_tools.random_fault_map("cap-ok", "cap32", rate=50 / 1024)
    over = ff_tools.random_fault_map("cap-over", "cap32", rate=51 / 1024)
    assert len(at_cap["faults"]) == 50 and len(over["faults"]) == 51
    with capped.client() as c:
        assert c.post("/api/v1/chips", json=at_cap).status_code == 201
        r = c.post("/api/v1/chips", json=over)
        assert r.status_code == 422, r.text
        assert r.json()["errors"][0]["loc"] == ["body", "faults"]
        assert "max_faults_per_map (50; FAULTFLEET_MAX_FAULTS_PER_MAP)" in r.json()["detail"]
        body = json.dumps(over) + "\n"
        r = c.post("/api/v1/chips/bulk", content=body, headers={"Content-Type": "application/x-ndjson"})
        line = r.json()["lines"][0]
        assert line["status"] == "rejected" and "max_faults_per_map" in line["errors"][0]["msg"], r.text
        assert c.get("/api/v1/chips/cap-over").status_code == 404


@pytest.mark.parametrize(
    "arrays, setting",
    [
        # 8 MiB of float32 zeros, over the 4 MiB byte cap
        ({"x_train": ((32768, 1, 8, 8), "<f4"), "y_train": ((32768,), "<i1")}, "max_dataset_bytes"),
        # 2 Mi uint8 elements: 2 MiB on disk, under the byte cap, but 8 MiB as float32
        ({"x_train": ((32768, 1, 8, 8), "|u1"), "y_train": ((32768,), "|u1")}, "max_dataset_elements"),
    ],
)
def test_dataset_caps_are_413s_naming_them(capped: Any, tmp_path: Path, arrays: dict[str, Any], setting: str) -> None:
    arrays |= {"x_test": ((10, 1, 8, 8), "<f4"), "y_test": ((10,), "<i8")}
    npz = deflated_zeros_npz(tmp_path / "d.npz", arrays).read_bytes()
    with capped.client() as c:
        r = _register(c, "cap32", f"capped-{setting}", npz)
        assert r.status_code == 413, r.text
        assert setting in r.json()["detail"] and f"FAULTFLEET_{setting.upper()}" in r.json()["detail"]


def test_weights_cap_is_a_413_naming_it_and_a_pt_under_it_loads(capped: Any) -> None:
    """A real mlp state_dict for digits (~200 KiB) over a 64 KiB cap, as .pt and as .safetensors;
    a .pt whose members fit is checked as far as loading into the architecture."""
    import torch

    import accelerator as acc
    from workers.export import state_dict_bytes

    model = acc.build_model("mlp", (1, 8, 8), 10, seed=0)
    as_pt = io.BytesIO()
    torch.save(model.state_dict(), as_pt)
    with capped.client() as c:
        for filename, weights in (("w.pt", as_pt.getvalue()), ("w.safetensors", state_dict_bytes(model.state_dict()))):
            r = _register_weights(c, "cap32", "capped-weights", filename, weights)
            assert r.status_code == 413, r.text
            assert "max_weights_bytes (65536; FAULTFLEET_MAX_WEIGHTS_BYTES)" in r.json()["detail"], r.text
        small = io.BytesIO()
        torch.save({"w": torch.zeros(4)}, small)  # under the cap: refused only as not fitting mlp
        r = _register_weights(c, "cap32", "capped-weights", "w.pt", small.getvalue())
        assert r.status_code == 422 and "cannot be loaded into mlp" in r.json()["detail"], r.text

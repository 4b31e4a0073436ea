"""Reading and writing Gmsh ``.msh`` files (ASCII 4.1 and 2.2), tetrahedra only."""

from __future__ import annotations

from pathlib import Path

import numpy as np

_TET4 = 4  # Gmsh element type of the 4-node tetrahedron


def read_msh(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Reads the vertices and 4-node tetrahedra of an ASCII Gmsh file.

    Args:
        path: a ``.msh`` file in Gmsh ASCII format 4.1 or 2.2.

    Returns:
        ``(vertices [n, 3] float64, tets [m, 4] int64)`` with 0-based, compacted indices.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is binary, of another version, or holds no tetrahedra.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"mesh file not found: {path}")
    sections = _split_sections(path.read_text(errors="replace"), path)
    if "MeshFormat" not in sections:
        raise ValueError(f"{path}: no $MeshFormat section; is this a Gmsh .msh file?")
    fmt = sections["MeshFormat"][0].split()
    version, file_type = fmt[0], fmt[1]
    if file_type != "0":
        raise ValueError(f"{path}: binary .msh is not supported; re-export it as ASCII")
    if not version.startswith(("2", "4")):
        raise ValueError(f"{path}: Gmsh format {version} is not supported (use 4.1 or 2.2)")
    try:
        if version.startswith("4"):
            tags, coords = _nodes_v4(sections, path)
            tets = _elements_v4(sections, path)
        else:
            tags, coords = _nodes_v2(sections, path)
            tets = _elements_v2(sections, path)
    except (ValueError, IndexError) as error:
        if str(error).startswith(str(path)):
            raise
        raise ValueError(f"{path}: malformed $Nodes or $Elements section ({error})") from None
    if len(tets) == 0:
        raise ValueError(f"{path}: the file holds no 4-node tetrahedra (Gmsh type 4)")
    # Map node tags to 0-based rows.
    lookup = np.full(int(tags.max()) + 1, -1, dtype=np.int64)
    lookup[tags] = np.arange(len(tags))
    if tets.max() >= len(lookup) or np.any(lookup[tets] < 0):
        raise ValueError(f"{path}: an element refers to a node tag that is not defined")
    return coords, lookup[tets]


def write_msh(path: str | Path, vertices: np.ndarray, tets: np.ndarray) -> None:
    """Writes vertices and tetrahedra as an ASCII Gmsh 4.1 file (one volume entity)."""
    n, m = len(vertices), len(tets)
    lines = ["$MeshFormat", "4.1 0 8", "$EndMeshFormat", "$Nodes", f"1 {n} 1 {n}", f"3 1 0 {n}"]
    lines += [str(i + 1) for i in range(n)]
    lines += [f"{x:.17g} {y:.17g} {z:.17g}" for x, y, z in vertices]
    lines += ["$EndNodes", "$Elements", f"1 {m} 1 {m}", f"3 1 {_TET4} {m}"]
    lines += [f"{e + 1} {a + 1} {b + 1} {c + 1} {d + 1}" for e, (a, b, c, d) in enumerate(tets)]
    lines += ["$EndElements", ""]
    Path(path).write_text("\n".join(lines))


def _split_sections(text: str, path: Path) -> dict[str, list[str]]:
    sections: dict[str, list[str]] = {}
    current: list[str] | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("$End"):
            current = None
        elif line.startswith("$"):
            current = sections.setdefault(line[1:], [])
        elif current is not None and line:
            current.append(line)
    return sections


def _nodes_v4(sections: dict[str, list[str]], path: Path) -> tuple[np.ndarray, np.ndarray]:
    lines = sections.get("Nodes")
    if not lines:
        raise ValueError(f"{path}: no $Nodes section")
    n_blocks = int(lines[0].split()[0])
    row = 1
    tags, coords = [], []
    for _ in range(n_blocks):
        count = int(lines[row].split()[3])
        row += 1
        tags.append(_table(lines[row : row + count], np.int64, count).reshape(-1))
        row += count
        coords.append(_table(lines[row : row + count], np.float64, count)[:, :3])
        row += count
    if not tags:
        return np.zeros(0, dtype=np.int64), np.zeros((0, 3))
    return np.concatenate(tags), np.concatenate(coords)


def _elements_v4(sections: dict[str, list[str]], path: Path) -> np.ndarray:
    lines = sections.get("Elements")
    if not lines:
        raise ValueError(f"{path}: no $Elements section")
    n_blocks = int(lines[0].split()[0])
    row = 1
    tets = []
    for _ in range(n_blocks):
        _, _, etype, count = (int(v) for v in lines[row].split()[:4])
        row += 1
        if etype == _TET4:
            tets.append(_table(lines[row : row + count], np.int64, count)[:, 1:5])
        row += count
    if not tets:
        return np.zeros((0, 4), dtype=np.int64)
    return np.concatenate(tets)


def _table(lines: list[str], dtype, count: int) -> np.ndarray:
    """Rows of numbers with the same count per row, parsed in one pass: ``[count, k]``."""
    if count == 0:
        return np.zeros((0, 1), dtype=dtype)
    values = np.array(" ".join(lines).split(), dtype=dtype)
    if len(lines) != count or values.size % count:
        raise ValueError(f"a block of {count} rows is truncated or has rows of unequal length")
    return values.reshape(count, -1)


def _nodes_v2(sections: dict[str, list[str]], path: Path) -> tuple[np.ndarray, np.ndarray]:
    lines = sections.get("Nodes")
    if not lines:
        raise ValueError(f"{path}: no $Nodes section")
    count = int(lines[0])
    data = [line.split() for line in lines[1 : 1 + count]]
    tags = np.asarray([int(d[0]) for d in data], dtype=np.int64)
    coords = np.asarray([[float(v) for v in d[1:4]] for d in data], dtype=np.float64)
    return tags, coords.reshape(-1, 3)


def _elements_v2(sections: dict[str, list[str]], path: Path) -> np.ndarray:
    lines = sections.get("Elements")
    if not lines:
        raise ValueError(f"{path}: no $Elements section")
    count = int(lines[0])
    tets = []
    for line in lines[1 : 1 + count]:
        values = [int(v) for v in line.split()]
        if values[1] == _TET4:
            n_tags = values[2]
            tets.append(values[3 + n_tags : 7 + n_tags])
    return np.asarray(tets, dtype=np.int64).reshape(-1, 4)

"""Reading and writing Gmsh ``.msh`` files (ASCII 4.1 and 2.2), tetrahedra only."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from diffsim.mesh.geometry import vertex_bodies

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
    vertices, tets, _ = read_msh_bodies(path)
    return vertices, tets


def read_msh_bodies(path: str | Path) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Like :func:`read_msh`, plus the body of each vertex.

    A tet's body is its physical volume tag (its elementary volume tag where it has none);
    bodies are numbered 0, 1, ... in the order of those tags. They are kept only where they
    split the vertices (no vertex used by tets of two bodies), as :func:`write_msh` writes
    them; otherwise, and for a file with one volume, ``body_ids`` is None.

    Returns:
        ``(vertices [n, 3] float64, tets [m, 4] int64, body_ids [n] int64 or None)``.
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
            tets, keys = _elements_v4(sections, path)
            keys = _physical_keys_v4(sections, keys)
        else:
            tags, coords = _nodes_v2(sections, path)
            tets, keys = _elements_v2(sections, path)
    except (ValueError, IndexError) as error:
        if str(error).startswith(str(path)):
            raise
        raise ValueError(f"{path}: malformed $Nodes or $Elements section ({error})") from None
    if len(tets) == 0:
        raise ValueError(
            f"{path}: the file holds no 4-node tetrahedra (Gmsh type 4); if it is a surface "
            "mesh, tetrahedralize it (gmsh -3, or TetMesh.from_surface on an .stl or .obj)"
        )
    # Map node tags to 0-based rows.
    lookup = np.full(int(tags.max()) + 1, -1, dtype=np.int64)
    lookup[tags] = np.arange(len(tags))
    if tets.max() >= len(lookup) or np.any(lookup[tets] < 0):
        raise ValueError(f"{path}: an element refers to a node tag that is not defined")
    tets = lookup[tets]
    return coords, tets, vertex_bodies(tets, keys, len(coords))


def write_msh(
    path: str | Path, vertices: np.ndarray, tets: np.ndarray, body_ids: np.ndarray | None = None
) -> None:
    """Writes vertices and tetrahedra as an ASCII Gmsh 4.1 file.

    Args:
        path: the ``.msh`` file to write.
        vertices: ``[n, 3]`` positions.
        tets: ``[m, 4]`` 0-based vertex indices.
        body_ids: ``[n]`` body of each vertex, or None. Body b becomes volume entity b + 1
            in physical group b + 1 (named ``body<b>``); :func:`read_msh_bodies` reads them
            back. Vertex and tet order are kept.
    """
    n, m = len(vertices), len(tets)
    vertex_body = np.zeros(n, dtype=np.int64) if body_ids is None else np.asarray(body_ids)
    tet_body = vertex_body[np.asarray(tets)[:, 0]] if m else np.zeros(0, dtype=np.int64)
    bodies = np.unique(vertex_body)
    lines = ["$MeshFormat", "4.1 0 8", "$EndMeshFormat"]
    if len(bodies) > 1:
        lines += ["$PhysicalNames", str(len(bodies))]
        lines += [f'3 {b + 1} "body{b}"' for b in bodies]
        lines += ["$EndPhysicalNames", "$Entities", f"0 0 0 {len(bodies)}"]
        for b in bodies:
            box = vertices[vertex_body == b]
            lo, hi = box.min(axis=0), box.max(axis=0)
            bounds = " ".join(f"{v:.17g}" for v in (*lo, *hi))
            lines.append(f"{b + 1} {bounds} 1 {b + 1} 0")
        lines.append("$EndEntities")
    node_runs = _runs(vertex_body)
    lines += ["$Nodes", f"{len(node_runs)} {n} 1 {n}"]
    for start, stop in node_runs:
        lines.append(f"3 {vertex_body[start] + 1} 0 {stop - start}")
        lines += [str(i + 1) for i in range(start, stop)]
        lines += [f"{x:.17g} {y:.17g} {z:.17g}" for x, y, z in vertices[start:stop]]
    tet_runs = _runs(tet_body)
    lines += ["$EndNodes", "$Elements", f"{len(tet_runs)} {m} 1 {m}"]
    for start, stop in tet_runs:
        lines.append(f"3 {tet_body[start] + 1} {_TET4} {stop - start}")
        lines += [
            f"{e + 1} {a + 1} {b + 1} {c + 1} {d + 1}"
            for e, (a, b, c, d) in enumerate(tets[start:stop], start)
        ]
    lines += ["$EndElements", ""]
    Path(path).write_text("\n".join(lines))


def _runs(values: np.ndarray) -> list[tuple[int, int]]:
    """``(start, stop)`` of each run of equal consecutive values."""
    if len(values) == 0:
        return []
    cuts = np.flatnonzero(values[1:] != values[:-1]) + 1
    edges = [0, *cuts.tolist(), len(values)]
    return list(zip(edges[:-1], edges[1:], strict=True))


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


def _elements_v4(sections: dict[str, list[str]], path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Tets ``[m, 4]`` (node tags) and the volume entity tag of each ``[m]``."""
    lines = sections.get("Elements")
    if not lines:
        raise ValueError(f"{path}: no $Elements section")
    n_blocks = int(lines[0].split()[0])
    row = 1
    tets, entities = [], []
    for _ in range(n_blocks):
        _, entity, etype, count = (int(v) for v in lines[row].split()[:4])
        row += 1
        if etype == _TET4:
            tets.append(_table(lines[row : row + count], np.int64, count)[:, 1:5])
            entities.append(np.full(count, entity, dtype=np.int64))
        row += count
    if not tets:
        return np.zeros((0, 4), dtype=np.int64), np.zeros(0, dtype=np.int64)
    return np.concatenate(tets), np.concatenate(entities)


def _physical_keys_v4(sections: dict[str, list[str]], entities: np.ndarray) -> np.ndarray:
    """Each tet's first physical tag from $Entities (its entity tag where there is none)."""
    lines = sections.get("Entities")
    if not lines:
        return entities
    try:
        counts = [int(v) for v in lines[0].split()[:4]]
        physical = {}
        for line in lines[1 + sum(counts[:3]) : 1 + sum(counts)]:
            values = line.split()
            n_physical = int(values[7])
            if n_physical:
                physical[int(values[0])] = int(values[8])
    except (ValueError, IndexError):
        return entities  # an unreadable $Entities section only loses the body ids
    # Physical tags after every elementary tag, so the two kinds never coincide.
    offset = int(entities.max(initial=0)) + 1
    return np.asarray(
        [physical[e] + offset if e in physical else e for e in entities.tolist()],
        dtype=np.int64,
    )


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


def _elements_v2(sections: dict[str, list[str]], path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Tets ``[m, 4]`` (node tags) and each one's physical tag ``[m]`` (0 where none)."""
    lines = sections.get("Elements")
    if not lines:
        raise ValueError(f"{path}: no $Elements section")
    count = int(lines[0])
    tets, keys = [], []
    for line in lines[1 : 1 + count]:
        values = [int(v) for v in line.split()]
        if values[1] == _TET4:
            n_tags = values[2]
            tets.append(values[3 + n_tags : 7 + n_tags])
            keys.append(values[3] if n_tags else 0)
    return np.asarray(tets, dtype=np.int64).reshape(-1, 4), np.asarray(keys, dtype=np.int64)

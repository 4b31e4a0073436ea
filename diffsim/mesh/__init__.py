"""The mesh layer: TetMesh (validation, builders, quality), tet geometry, file formats and the
built-in tetrahedralizer. Imports nothing else from diffsim."""

from diffsim.mesh.tet_mesh import MeshQuality, TetMesh

__all__ = ["MeshQuality", "TetMesh"]

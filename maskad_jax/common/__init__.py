"""What every layer uses: errors (the UserError family), digests, progress and logs, device placement
(meshes, shardings, gathers, the writer process).
"""

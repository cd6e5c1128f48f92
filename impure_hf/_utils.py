"""Small helpers shared across the package (file listing, process state, parsing, atomic writes).

Imports nothing else of the package (DESIGN.md section 7), so any module may use it.
"""

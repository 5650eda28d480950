"""The fault suite: the example proxy under real uvicorn processes, against databases that fail.

Marked ``fault`` and left out of the default run; ``python -m pytest -m fault`` runs it.
"""

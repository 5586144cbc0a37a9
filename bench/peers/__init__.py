"""The peer servers of the fan-out benchmark (bench/run.py), each what a team might pick
instead of ours; the Python ones run from their own venv (bench/peers/.venv, the
``bench-peers`` dependency group), never from the project's."""

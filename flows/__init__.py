"""Prefect flows. Importing the package prepares the process first (``tasks.process_start``):
the command and every deployment's flow run import it before torch."""

from tasks.process_start import start_process

start_process()

"""python -m procident"""

from procident.cli import run

run()

"""python -m procident"""

from procident.cli import main

main()

import os
import sys

# Benchmarks import their corpus helpers from this folder.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

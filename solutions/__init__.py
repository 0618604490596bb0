"""Solutions to the lessons' exercises: lesson_NN.py defines the names each lesson's exercise cells stub out.

The tests replace every exercise cell by `from solutions.lesson_NN import *` and expect every checker to pass.
"""

"""Value sets: the values V a meta-instruction must honour, their definitions and tensions."""

from picaco.values.model import Tension, Value, ValueSet
from picaco.values.loader import bundled_value_sets, load_value_set

__all__ = ["Tension", "Value", "ValueSet", "bundled_value_sets", "load_value_set"]

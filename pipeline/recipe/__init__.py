"""Recipes, torch-free: the file's schema, YAML with line numbers, the checked plan, the JSON Schema."""

from pipeline.recipe.plan import Plan, factory_references, load_recipe
from pipeline.recipe.schema import ModelSpec, Recipe

__all__ = ["ModelSpec", "Plan", "Recipe", "factory_references", "load_recipe"]

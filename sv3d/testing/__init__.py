"""The fixed set of generated test objects (GSO layout) that every stage is measured on."""

from .objects import TEST_OBJECTS, make_test_object, write_test_object, write_test_objects

__all__ = ["TEST_OBJECTS", "make_test_object", "write_test_object", "write_test_objects"]

import pytest


@pytest.fixture(scope="session", autouse=True)
def report():
    """`make fuzz` prints, per format and route, the cases run, accepted, refused and defects."""
    from .test_files import COUNTS

    yield
    for fmt, counts in sorted(COUNTS.items()):
        total = sum(counts.values())
        print(f"\nfuzz {fmt}: {total} cases, {counts['accepted']} accepted, {counts['refused']} refused, "
              f"{counts['defect']} defects")

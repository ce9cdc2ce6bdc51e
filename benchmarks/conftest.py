"""Options of the pytest-benchmark suite (bench_cases.py): the profile and mask size of ddps bench."""


def pytest_addoption(parser):
    parser.addoption("--ddps-full", action="store_true", help="the cases of `ddps bench --full`")
    parser.addoption("--ddps-size", type=int, default=128, help="mask size S of the cases (default 128)")
    parser.addoption("--ddps-device", default="cpu", choices=("cpu", "cuda"), help="device (default cpu)")

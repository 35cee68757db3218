"""MkDocs hooks: pages that other work will write are tolerated while they are absent.

A page named in ``nav`` that does not exist yet gets a one-line placeholder, so that the
navigation, the links to it and ``mkdocs build --strict`` all hold; the placeholder
disappears as soon as the real page is added.
"""

from mkdocs.structure.files import File

PLANNED = {
    "dependency-graph.md": "Dependency graphs and attention masks",
    "benchmarks.md": "Benchmarks",
    "samplers.md": "Samplers",
    "intervals.md": "Interval conditions",
    "log-density.md": "Log densities",
}


def on_files(files, config):
    for name, title in PLANNED.items():
        if files.get_file_from_path(name) is None:
            files.append(File.generated(config, name, content=f"# {title}\n\nThis page is being written.\n"))
    return files

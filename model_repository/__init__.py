"""The model repository's contract (`models/README.md`), shared by `training/` (which writes it) and
`service/` (which reads it): the card's format and fields, the model kinds and likelihoods, the graphs
with their input and output names, the pixel convention and the units of the reported figures.

It imports neither torch nor FastAPI (numpy and Pillow only), so the service's runtime image ships it
without `training/`; tests/test_architecture.py keeps it that way.

    card.py     card.json: format version, kinds, likelihoods, the reader and the writer
    graphs.py   each graph's role, inputs and outputs; the graphs each kind must have
    pixels.py   image files -> float32 intensities with a model's channels, resizing
    units.py    bits per dimension from nats per image, and how they were computed
"""

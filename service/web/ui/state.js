// What the page's modules share: the page's state, element lookup, and latest-wins turns.

export const $ = (id) => document.getElementById(id);

export const state = {
  models: [],
  model: null, // the chosen entry of GET /models
  file: null, // an uploaded File, else the pad's drawing is the input
  x: null, // the pixels the model sees (from /preprocess)
  code: null, // the decoder's input for x: the posterior mean, z_K for flow models
  samples: null, // the last GET /sample answer
  ends: { a: null, b: null }, // interpolation ends: { z, image, label }
  dimChosen: false, // the traversal's dimension was picked by hand (else: the input's most certain one)
};

// Latest wins: a picture is drawn only by the newest request for it (answers may arrive out of order).
const turns = {};
export function turn(name) {
  const t = (turns[name] || 0) + 1;
  turns[name] = t;
  return () => turns[name] === t;
}

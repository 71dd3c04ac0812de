// A prompt recording for the multipart scenario: the file named by PROMPT_FILE (read in k6's
// init context), or a generated 4 s, 16 kHz, 16-bit mono WAV of a voiced, syllable-like tone
// (harmonics of a 120 Hz fundamental under a 4 Hz envelope), so nothing binary is committed.

export function synthPromptWav(seconds = 4, rate = 16000) {
  const samples = Math.floor(seconds * rate);
  const buffer = new ArrayBuffer(44 + samples * 2);
  const view = new DataView(buffer);
  const ascii = (offset, text) => {
    for (let i = 0; i < text.length; i += 1) {
      view.setUint8(offset + i, text.charCodeAt(i));
    }
  };
  ascii(0, 'RIFF');
  view.setUint32(4, 36 + samples * 2, true);
  ascii(8, 'WAVE');
  ascii(12, 'fmt ');
  view.setUint32(16, 16, true);
  view.setUint16(20, 1, true);
  view.setUint16(22, 1, true);
  view.setUint32(24, rate, true);
  view.setUint32(28, rate * 2, true);
  view.setUint16(32, 2, true);
  view.setUint16(34, 16, true);
  ascii(36, 'data');
  view.setUint32(40, samples * 2, true);
  let phase = 0;
  for (let n = 0; n < samples; n += 1) {
    const t = n / rate;
    const f0 = 120 + 15 * Math.sin(2 * Math.PI * 0.7 * t);
    phase += (2 * Math.PI * f0) / rate;
    let voiced = 0;
    for (let h = 1; h <= 8; h += 1) {
      voiced += Math.sin(h * phase) / h;
    }
    const envelope = 0.5 * (1 - Math.cos(2 * Math.PI * 4 * t));
    const value = Math.max(-1, Math.min(1, 0.3 * envelope * voiced));
    view.setInt16(44 + n * 2, Math.round(value * 32767), true);
  }
  return buffer;
}

//! Training text for the test tokenizer. Changing a single byte changes the vocabulary and
//! therefore every golden file, so treat this as frozen.

/// A few KB of prose, code, numbers and multi-byte UTF-8 (accents, Greek, CJK, emoji).
pub const CORPUS: &str = r#"The quick brown fox jumps over the lazy dog. A small model can still say a lot.
Once upon a time, in a quiet village by the sea, there lived an old fisherman who talked to the waves.
Every morning he would walk down to the harbor, check his nets, and tell the gulls about the weather.
The children of the village thought he was strange, but they loved his stories about distant islands.
"Where do the ships go when they disappear over the horizon?" asked a girl named Clara.
"They go where the maps end," he said, "and where new maps begin."
It was the best of times, it was the worst of times; it was the age of wisdom, it was the age of foolishness.
Science is a way of thinking much more than it is a body of knowledge.
The weather today is sunny with a high of 24 degrees and a light breeze from the west.
Please remember to bring your notebook, two pencils, and a calculator to the exam on Monday.
In 1969, Apollo 11 landed on the Moon; Neil Armstrong and Buzz Aldrin walked on the surface for about 2.5 hours.
The population grew from 1,250,000 in 1990 to 3,480,512 in 2020, an increase of 178.4 percent.
Prices: apples $1.99/lb, bread $3.50, milk $2.25 (up 4% since last year). Total: $7.74.
Call 555-0134 or visit room 42B between 9:00 and 17:30. The answer is 42, not 41 or 43.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 32 64 128 256 512 1024 2048 4096 65536 3.14159 2.71828 1e-6.

def fibonacci(n):
    """Return the n-th Fibonacci number."""
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a

fn main() {
    let words = vec!["alpha", "beta", "gamma"];
    for (i, w) in words.iter().enumerate() {
        println!("{i}: {w}");
    }
}

#include <stdio.h>
int main(void) { printf("hello, world\n"); return 0; }

SELECT name, COUNT(*) AS total FROM orders WHERE price > 10.0 GROUP BY name ORDER BY total DESC;
{"id": 7, "name": "widget", "tags": ["red", "small"], "price": 12.5, "in_stock": true}
<html><body><p class="note">Hello &amp; welcome!</p></body></html>

Le café est délicieux, mais la crème brûlée est encore meilleure. Où est la bibliothèque ? À bientôt !
El niño comió una piña en la montaña. ¿Qué hora es? ¡Mañana será otro día!
Der Bär läuft über die Straße, weil er Hunger hat. Schöne Grüße aus München.
São Paulo é uma cidade enorme; a população é de milhões. Ação, coração, não.
Øresund, Ærø, Åland — smørrebrød og kærlighed. Český Krumlov, Łódź, Kraków, İstanbul.
Η γρήγορη καφέ αλεπού πηδά πάνω από τον τεμπέλη σκύλο. Καλημέρα, τι κάνεις; Ευχαριστώ πολύ.
Αλφα, βήτα, γάμμα, δέλτα: α β γ δ ε ζ η θ ι κ λ μ ν ξ ο π ρ σ τ υ φ χ ψ ω. Το πι είναι περίπου 3,14.
Привет, как дела? Москва — столица России. Спасибо большое!
今天天气很好，我们去公园散步吧。我喜欢学习中文和写代码。
人工智能正在改变世界。这个模型很小，但是它可以说话。北京、上海、广州、深圳。
東京は日本の首都です。ありがとうございます。ひらがな、カタカナ、漢字。
안녕하세요, 만나서 반갑습니다. 한국어를 공부하고 있어요.
مرحبا بالعالم. שלום עולם. नमस्ते दुनिया.
Emoji time: 😀 😂 🥲 🎉 🚀 🌍 🍕 ❤️ 👍🏽 👨‍👩‍👧 🇫🇷 — the fox 🦊 and the dog 🐶 are friends ✨.
Math symbols: ∑ ∫ √ ∞ ≈ ≠ ≤ ≥ ∂ ∇ π ∈ ∀ ∃ → ⇒ ±; currencies € £ ¥ ₹ ₩; quotes “ ” ‘ ’ « ».

User: Can you summarize the story in one sentence?
Assistant: An old fisherman shares stories about distant lands with the curious children of his village.
User: What is the capital of France?
Assistant: The capital of France is Paris.
User: Translate "good morning" into Spanish, French and German.
Assistant: Buenos días, bonjour, and guten Morgen.
System: You are a helpful assistant that answers briefly and honestly.

The committee reviewed the proposal carefully and decided to postpone the vote until further data were available.
Although the experiment failed twice, the team learned something important each time and improved the design.
Water boils at 100 degrees Celsius at sea level, but at lower temperatures on high mountains.
She opened the window, and the smell of rain and fresh bread drifted into the room.
Good software is written for people to read, and only incidentally for machines to execute.
The library opens at eight in the morning and closes at nine in the evening, except on holidays.
Questions, answers, examples, exercises: learning happens when we try, fail, and try again.
"#;

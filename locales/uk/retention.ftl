cart-reminder = { $first_name }, у вашому кошику залишилося: { $cart_updated_items }. Товари досі чекають на вас.
cart-btn-checkout = До кошика
cart-code = Ще вагаєтеся? Ось код { $cart_code } на знижку 10% на кошик — діє 48 годин.
cart-last-call = Ваш кошик збережено: { $cart_updated_items }. Оформіть замовлення, коли будете готові.
viewed-reminder = Досі думаєте про { $product_viewed_title }? Ось він: { $product_viewed_url }
birthday-code = З днем народження, { $first_name }! 🎂 Ваш подарунок: код { $birthday_code } на знижку 20%, діє тиждень.
birthday-wishes = З днем народження, { $first_name }! 🎂 Бажаємо чудового року.
